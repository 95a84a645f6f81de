"""Triton routing kernels: route decisions (Linear routers, or the seeded forced hash) and the
compaction that turns them into row indices."""
import torch
import triton
import triton.language as tl

from .._common import bool_bytes, bytes_to_bool, cdiv, known_empty, launch, next_power_of_2
from .reference import layer_term


@triton.jit(do_not_specialize=["T", "L", "B", "valid_stride_b", "valid_stride_l"])
def _compact_kernel(exec_ptr, valid_ptr, counts_ptr, rows_ptr, slot_ptr, offsets_ptr, T, L, B,
                    valid_stride_b, valid_stride_l,
                    HAS_VALID: tl.constexpr, HAS_COUNTS: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    exec_ptr += r * T
    rows_ptr += r * T
    slot_ptr += r * T
    offsets_ptr += r * (B + 1)
    carry = tl.zeros((), dtype=tl.int32)
    n_valid = tl.zeros((), dtype=tl.int32)
    for start in range(0, T, BLOCK):
        t = start + tl.arange(0, BLOCK)
        in_range = t < T
        # A bool tensor may hold bytes other than 0/1 (say viewed from uint8): any nonzero byte
        # is True, as in PyTorch. Summing raw bytes would push slots past T and the store below
        # out of bounds.
        e = (tl.load(exec_ptr + t, mask=in_range, other=0) != 0).to(tl.int32)
        if HAS_VALID:
            # valid may be a strided view (the new tokens' columns of a longer mask).
            at = (t // L).to(tl.int64) * valid_stride_b + (t % L).to(tl.int64) * valid_stride_l
            v = (tl.load(valid_ptr + at, mask=in_range, other=0) != 0).to(tl.int32)
            e = e * v
            n_valid += tl.sum(v, axis=0)
        inclusive = tl.cumsum(e, axis=0) + carry
        slot = tl.where(e != 0, inclusive - 1, -1)
        tl.store(slot_ptr + t, slot, mask=in_range)
        tl.store(rows_ptr + slot, t, mask=in_range & (e != 0))
        # The first token of sequence b records how many tokens executed before it.
        first = in_range & (t % L == 0)
        tl.store(offsets_ptr + t // L, inclusive - e, mask=first)
        carry += tl.sum(e, axis=0)
    tl.store(offsets_ptr + B, carry)
    if HAS_COUNTS:
        # One program per route set, each adding to its own counter; the first also counts the
        # valid tokens (counters[R]).
        tl.store(counts_ptr + r, tl.load(counts_ptr + r) + carry.to(tl.int64))
        if r == 0:
            last = counts_ptr + tl.num_programs(0)
            # T + a zero tensor, not T.to(): where torch.compile checks which arguments the kernel
            # writes, it passes a static T as a Python int, which has no .to (and the check, failing,
            # would take every argument as written).
            tl.store(last, tl.load(last) + (n_valid.to(tl.int64) if HAS_VALID else tl.zeros((), dtype=tl.int64) + T))
    for start in range(0, T, BLOCK):
        t = start + tl.arange(0, BLOCK)
        tl.store(rows_ptr + t, -1, mask=(t >= carry) & (t < T))


def compact(execute: torch.Tensor, valid=None, route_counts=None):
    R, B, L = execute.shape
    T = B * L
    rows = torch.empty(R, T, dtype=torch.int32, device=execute.device)
    slot = torch.empty(R, T, dtype=torch.int32, device=execute.device)
    offsets = torch.empty(R, B + 1, dtype=torch.int32, device=execute.device)
    if known_empty(R) or known_empty(T):
        offsets.zero_()
        if route_counts is not None and not known_empty(T):  # no route set, but valid tokens
            route_counts[R:].add_(valid.sum() if valid is not None else T)
        return rows, slot, offsets
    # An absent tensor's place is taken by one the kernel already has (execute for valid, the
    # offsets output for the counters); it never touches it (HAS_* False).
    exec_bytes = bool_bytes(execute)
    valid_bytes = bool_bytes(valid) if valid is not None else exec_bytes
    launch(_compact_kernel)[(R,)](
        exec_bytes, valid_bytes, route_counts if route_counts is not None else offsets, rows, slot, offsets,
        T, L, B, *(valid_bytes.stride() if valid is not None else (0, 0)),
        HAS_VALID=valid is not None, HAS_COUNTS=route_counts is not None, BLOCK=_compact_block(T))
    return rows, slot, offsets


def _compact_block(T) -> int:
    """The scan is serial over blocks, so the block sets its step count: T's next power of two up
    to 1024, and 1024 for a symbolic T (a traced op), where picking by T would guard on it. That
    is every large step's block anyway; a step of a few tokens pays a few idle lanes. (A fixed 128
    cost ~1.3 ms a layer at 16K tokens, compiled; docs/BENCHMARKS.md.)"""
    return min(1024, next_power_of_2(T)) if type(T) is int else 1024


@triton.jit(do_not_specialize=["L", "start_ptr", "layer_term"])  # one compile for every layer
def _forced_execute_kernel(params_ptr, start_ptr, out_ptr, L, layer_term, BLOCK: tl.constexpr):
    # One program per (module, sequence) row of L tokens; the same hash as the reference.
    # layer_term = (layer_idx * 131 + 1) mod prime, computed on the host (no int32 overflow).
    row = tl.program_id(0).to(tl.int64)  # module * B + b
    prime = 2147483647
    # Triton's % truncates (C); torch's takes the divisor's sign. Lift negative remainders so
    # negative seeds and slots hash as in the reference.
    base = (tl.load(params_ptr) * 7919 + layer_term) % prime
    base = tl.where(base < 0, base + prime, base)
    threshold = tl.load(params_ptr + 1)
    start = tl.load(start_ptr)
    for l0 in range(0, L, BLOCK):
        l = l0 + tl.arange(0, BLOCK)
        h = (row * 104729 + (start + l) * 7919 + base) % prime
        h = tl.where(h < 0, h + prime, h)
        h = (h * 48271) % prime
        h = h ^ (h >> 15)
        h = (h * 69621) % prime
        h = h ^ (h >> 15)
        h = (h * 16807) % prime
        h = h ^ (h >> 15)
        tl.store(out_ptr + row * L + l, (h >= threshold).to(tl.int8), mask=l < L)


@triton.jit(do_not_specialize=["T"])
def _router_execute_kernel(x_ptr, w_ptr, b_ptr, out_ptr, T,
                           H: tl.constexpr, R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    # Each program scores BLOCK_T tokens with all 2R logits from one read of x (no fp32 copy).
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    j = tl.arange(0, 2 * R)  # logit index: 2r = EXECUTE, 2r + 1 = SKIP of router r
    acc = tl.zeros([BLOCK_T, 2 * R], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        h_ok = h < H
        x = tl.load(x_ptr + t[:, None].to(tl.int64) * H + h[None, :], mask=t_ok[:, None] & h_ok[None, :], other=0.0)
        x = x.to(w_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + j[:, None] * H + h[None, :], mask=h_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    # Logits rounded to the routers' dtype, then argmax semantics: NaN is the maximum and a tie
    # picks index 0 (EXECUTE).
    logits = (acc + tl.load(b_ptr + j).to(tl.float32)[None, :]).to(w_ptr.dtype.element_ty).to(tl.float32)
    l0, l1 = tl.split(tl.reshape(logits, [BLOCK_T, R, 2]))
    execute = (l0 != l0) | ((l1 == l1) & (l0 >= l1))  # [BLOCK_T, R]
    r = tl.arange(0, R)
    tl.store(out_ptr + r[None, :] * T + t[:, None], execute.to(tl.int8), mask=t_ok[:, None])


def _forced_block(seq_len) -> int:
    """L's next power of two up to 1024; for a symbolic L (a traced op) a fixed 256, since picking
    by L would guard on it. Its blocks are independent, so the size barely matters."""
    return min(1024, next_power_of_2(seq_len)) if type(seq_len) is int else 256


def forced_execute(params, start, batch, seq_len, layer_idx):
    out = torch.empty(2, batch, seq_len, dtype=torch.int8, device=start.device)
    if not known_empty(batch * seq_len):
        launch(_forced_execute_kernel)[(2 * batch,)](
            params, start, out, seq_len, layer_term(layer_idx), BLOCK=_forced_block(seq_len)
        )
    return bytes_to_bool(out)


def router_execute(x, weight, bias):
    T, H = x.shape
    R = weight.shape[0] // 2
    out = torch.empty(R, T, dtype=torch.int8, device=x.device)
    if not known_empty(T):
        block_t = 16
        launch(_router_execute_kernel)[(cdiv(T, block_t),)](
            x, weight, bias, out, T, H=H, R=R, BLOCK_T=block_t,
            BLOCK_H=max(1, min(128, next_power_of_2(H))),  # H == 0: bias only, arange needs >= 1
        )
    return bytes_to_bool(out)
