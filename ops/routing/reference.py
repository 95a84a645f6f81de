"""Pure-PyTorch routing ops: the CPU implementations and the references for the Triton kernels."""
from typing import Optional

import torch
import torch.nn.functional as F

HASH_PRIME = 2147483647  # 2^31 - 1: keeps every product below 2^62, so int64 never overflows
# Three multiply-mod rounds with distinct Lehmer multipliers, each followed by a xor-shift:
# fewer rounds left measurable correlation between neighbouring tokens and between modules.
HASH_MULTIPLIERS = (48271, 69621, 16807)


def layer_term(layer_idx: int) -> int:
    """The layer's share of the hash seed, in [0, 2^31 - 1)."""
    return (int(layer_idx) * 131 + 1) % HASH_PRIME


def forced_execute_reference(params: torch.Tensor, start: torch.Tensor, batch: int, seq_len: int, layer_idx: int):
    """Seeded pseudo-random routes: [2, B, L] bool (row 0 attention, row 1 MLP), True = execute.

    params: [2] int64 (seed, skip threshold = rate * (2^31 - 1)); start: [1] int64, the cache
    slot of token column 0. Token (b, l) at slot start + l of module m skips when
    hash(seed, layer, m, b, slot) < threshold: a pure function of those five numbers. `%` is
    torch's (the result takes the divisor's sign), so negative seeds and slots hash too; int64
    products wrap around the same way on every device.
    """
    device = start.device
    params = params.to(device)
    slots = start.reshape(1) + torch.arange(seq_len, device=device)
    # (layer * 131 + 1) reduced first (the same value mod the prime) so that any int layer_idx
    # fits the int64 arithmetic; the kernel receives this very number.
    base = (params[0] * 7919 + layer_term(layer_idx)) % HASH_PRIME
    module_and_seq = torch.arange(2 * batch, device=device, dtype=torch.int64).view(2, batch, 1)
    h = (module_and_seq * 104729 + slots * 7919 + base) % HASH_PRIME
    for mult in HASH_MULTIPLIERS:
        h = (h * mult) % HASH_PRIME
        h = h ^ (h >> 15)
    return h >= params[1]


def router_execute_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """R Linear routers at once: x [T, H] -> [R, T] bool, True = execute.

    weight [2R, H], bias [2R]: router r's logits are rows 2r (EXECUTE) and 2r+1 (SKIP),
    computed in the weight's dtype (x is cast to it); a tie executes, as argmax picks index 0.
    """
    # R spelled out: with T = 0 a -1 could be any size (view refuses it).
    logits = F.linear(x.to(weight.dtype), weight, bias).view(x.shape[0], weight.shape[0] // 2, 2)
    return (logits.argmax(-1) == 0).t().contiguous()  # argmax: NaN counts as the maximum


def compact_reference(execute: torch.Tensor, valid: Optional[torch.Tensor] = None,
                      route_counts: Optional[torch.Tensor] = None):
    """execute: [R, B, L] bool, one route set per leading index (say attention and MLP).
    valid: optional [B, L] bool; a token where it is False (padding) executes in no route set.
    route_counts: optional [R+1] int64, accumulated in place: route_counts[r] += N_r, and
    route_counts[R] += the number of valid tokens (B*L without `valid`).

    Returns, for each route set r, with T = B*L and N_r executing tokens:
      rows        [R, T] int32: rows[r, :N_r] are the flat indices (b*L + l) of executing tokens in
                  ascending order; rows[r, N_r:] = -1.
      slot        [R, T] int32: slot[r, t] = position of token t in rows[r], or -1 if it skips.
      seq_offsets [R, B+1] int32: seq_offsets[r, b] = executing tokens in sequences before b;
                  seq_offsets[r, B] = N_r, the count.
    """
    R, B, L = execute.shape
    T = B * L
    if valid is not None:
        execute = execute & valid
    flat = execute.reshape(R, T)
    inclusive = flat.to(torch.int32).cumsum(-1, dtype=torch.int32)
    slot = torch.where(flat, inclusive - 1, -1).to(torch.int32)
    # Skipping tokens scatter into a spill column T that is cut off afterwards: no boolean
    # indexing, so no host sync even in the reference.
    target = torch.where(flat, slot, T).to(torch.int64)
    token = torch.arange(T, dtype=torch.int32, device=execute.device).expand(R, T)
    rows = torch.full((R, T + 1), -1, dtype=torch.int32, device=execute.device)
    rows.scatter_(1, target, token)
    seq_offsets = torch.zeros(R, B + 1, dtype=torch.int32, device=execute.device)
    if T > 0:
        seq_offsets[:, 1:] = inclusive.view(R, B, L)[:, :, -1]
    if route_counts is not None:
        route_counts[:R].add_(seq_offsets[:, -1])
        route_counts[R].add_(valid.sum() if valid is not None else T)
    return rows[:, :T].contiguous(), slot, seq_offsets
