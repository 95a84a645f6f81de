"""Triton compaction: one program per route set scans the execute mask block by block."""
import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["T", "L", "B"])
def _compact_kernel(exec_ptr, rows_ptr, slot_ptr, offsets_ptr, T, L, B, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    exec_ptr += r * T
    rows_ptr += r * T
    slot_ptr += r * T
    offsets_ptr += r * (B + 1)
    carry = tl.zeros((), dtype=tl.int32)
    for start in range(0, T, BLOCK):
        t = start + tl.arange(0, BLOCK)
        in_range = t < T
        e = tl.load(exec_ptr + t, mask=in_range, other=0).to(tl.int32)
        inclusive = tl.cumsum(e, axis=0) + carry
        slot = tl.where(e != 0, inclusive - 1, -1)
        tl.store(slot_ptr + t, slot, mask=in_range)
        tl.store(rows_ptr + slot, t, mask=in_range & (e != 0))
        # The first token of sequence b records how many tokens executed before it.
        first = in_range & (t % L == 0)
        tl.store(offsets_ptr + t // L, inclusive - e, mask=first)
        carry += tl.sum(e, axis=0)
    tl.store(offsets_ptr + B, carry)
    for start in range(0, T, BLOCK):
        t = start + tl.arange(0, BLOCK)
        tl.store(rows_ptr + t, -1, mask=(t >= carry) & (t < T))


def compact(execute: torch.Tensor):
    R, B, L = execute.shape
    T = B * L
    rows = torch.empty(R, T, dtype=torch.int32, device=execute.device)
    slot = torch.empty(R, T, dtype=torch.int32, device=execute.device)
    offsets = torch.empty(R, B + 1, dtype=torch.int32, device=execute.device)
    if R == 0:
        return rows, slot, offsets
    if T == 0:
        offsets.zero_()
        return rows, slot, offsets
    block = min(1024, triton.next_power_of_2(T))
    _compact_kernel[(R,)](execute.view(torch.uint8), rows, slot, offsets, T, L, B, BLOCK=block)
    return rows, slot, offsets
