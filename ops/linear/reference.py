"""Pure-PyTorch projections over compacted rows, rounded like the Hugging Face modules."""
from typing import Optional

import torch
import torch.nn.functional as F

from ..rope.reference import rope_kv_write_reference, rope_reference

ACTIVATIONS = {"silu": F.silu, "relu": F.relu}


def _valid_rows(m: int, count: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    if count is None:
        return None
    return torch.arange(m, device=device) < count.to(device)


def _zero_invalid(y: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    if valid is None:
        return y
    return torch.where(valid[:, None], y, torch.zeros((), dtype=y.dtype, device=y.device))


def linear_rows_reference(x, weight, bias=None, count=None):
    """x [M, K] @ weight [N, K].T (+ bias [N]) -> [M, N]; rows >= count zero."""
    return _zero_invalid(F.linear(x, weight, bias), _valid_rows(x.shape[0], count, x.device))


def gated_mlp_reference(x, w_gate, w_up, activation: str, count=None):
    """act(x @ w_gate.T) * (x @ w_up.T): x [M, K], w_gate/w_up [I, K] -> [M, I]; rows >= count zero."""
    y = ACTIVATIONS[activation](F.linear(x, w_gate)) * F.linear(x, w_up)
    return _zero_invalid(y, _valid_rows(x.shape[0], count, x.device))


def linear_residual_reference(residual, x, weight, slot=None, count=None, rows=None):
    """out[t] = residual[t] + x[slot[t]] @ weight.T where slot[t] >= 0 (and < count, and with
    rows given rows[slot[t]] == t), else residual[t]. Without slot, x's rows are residual's rows.
    residual [T, N], x [M, K], rows [M]."""
    y = F.linear(x, weight)
    if slot is None:
        return residual + y
    if y.shape[0] == 0:  # no executing row (exact form): nothing to gather from y
        return residual.clone()
    limit = x.shape[0] if count is None else torch.clamp(count.to(x.device), max=x.shape[0])
    take = (slot >= 0) & (slot < limit)
    at = torch.where(take, slot, 0).long()  # a valid row for tokens that take none (a slot past M)
    if rows is not None:
        take &= rows[at] == torch.arange(slot.shape[0], device=slot.device)
    return torch.where(take[:, None], residual + y[at], residual)


def qkv_rope_write_reference(x, w_q, w_k, w_v, b_q, b_k, b_v, cos, sin, rows, count, k_cache, v_cache, start):
    """K/V of every token of x [T, H] written into the caches [B, S, Hk, D] at slots start..
    (K rotated), and rotated Q of the rows [M] -> [M, Hq, D]; rows >= count zero, a row outside
    [0, T) a zero row."""
    B, _, num_kv_heads, head_dim = k_cache.shape
    L = x.shape[0] // B if B else 0
    kv_shape = (B, L, num_kv_heads, head_dim)
    rope_kv_write_reference(F.linear(x, w_k, b_k).view(kv_shape), F.linear(x, w_v, b_v).view(kv_shape),
                            cos.view(B, L, head_dim), sin.view(B, L, head_dim), k_cache, v_cache, start)
    valid = (rows >= 0) & (rows < x.shape[0])
    xq = torch.where(valid[:, None], x[torch.where(valid, rows, 0).long()], torch.zeros((), dtype=x.dtype))
    q = linear_rows_reference(xq, w_q, b_q, count)
    return rope_reference(q.view(q.shape[0], w_q.shape[0] // head_dim, head_dim), cos, sin, rows, count)
