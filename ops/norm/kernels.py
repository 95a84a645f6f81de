"""Triton RMSNorm: one program per output row, optionally gathering its input row and/or
scattering a second copy into a compacted tensor, so compaction costs no extra pass over x."""
import torch
import triton
import triton.language as tl

from .._common import known_empty, launch, next_power_of_2


# Index pointers (rows, count, slot) are often views at an offset into the compacted tensors
# (route set 1, seq_offsets[r, B:]), so their 16-byte alignment changes with the token count:
# leaving them unspecialised keeps one compiled kernel for every batch and sequence length.
@triton.jit(do_not_specialize=["M", "T", "NQ", "rows_ptr", "count_ptr", "slot_ptr"])
def _rms_norm_kernel(
    x_ptr, w_ptr, out_ptr, rows_ptr, count_ptr, slot_ptr, outq_ptr,
    M, T, NQ, eps,
    H: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_ROWS: tl.constexpr, HAS_COUNT: tl.constexpr, HAS_SLOT: tl.constexpr,
):
    m = tl.program_id(0)
    limit = M
    if HAS_COUNT:
        limit = tl.minimum(tl.load(count_ptr), M)
    if m < limit:
        src = m
        if HAS_ROWS:
            src = tl.load(rows_ptr + m)
        src_ok = (src >= 0) & (src < T)
        src = tl.where(src_ok, src, 0).to(tl.int64)
        cols = tl.arange(0, BLOCK_H)
        in_row = cols < H
        x = tl.load(x_ptr + src * H + cols, mask=in_row & src_ok, other=0.0).to(tl.float32)
        # The cast: Inductor passes a Python float as fp64 (Triton's launcher: fp32).
        inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / H + tl.cast(eps, tl.float32))
        w = tl.load(w_ptr + cols, mask=in_row, other=0.0)
        # Round to the input dtype before the weight, as the Hugging Face RMSNorm does.
        y = (w.to(tl.float32) * (x * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32))
        y = y.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + m.to(tl.int64) * H + cols, y, mask=in_row)
        if HAS_SLOT:
            s = tl.load(slot_ptr + m)
            if (s >= 0) & (s < NQ):
                tl.store(outq_ptr + s.to(tl.int64) * H + cols, y, mask=in_row)


def _launch(x, weight, eps, out, rows=None, count=None, slot=None, outq=None):
    M, H = out.shape
    if known_empty(M * H):  # nothing to write (and tl.arange cannot tile H = 0)
        return
    block_h = next_power_of_2(H)
    num_warps = min(16, max(1, block_h // 256))
    # Stands in for absent pointers (never dereferenced: the flag is off). An input, not the
    # output: traced under torch.compile, an argument that aliases a written one would be
    # taken for written too.
    dummy = weight
    launch(_rms_norm_kernel)[(M,)](
        x, weight, out,
        rows if rows is not None else dummy,
        count if count is not None else dummy,
        slot if slot is not None else dummy,
        outq if outq is not None else dummy,
        M, x.shape[0], outq.shape[0] if outq is not None else 0, eps,
        H=H, BLOCK_H=block_h,
        HAS_ROWS=rows is not None, HAS_COUNT=count is not None, HAS_SLOT=slot is not None,
        num_warps=num_warps,
    )


def rms_norm(x, weight, eps, rows=None, count=None):
    M = x.shape[0] if rows is None else rows.shape[0]
    out = torch.empty(M, x.shape[1], dtype=x.dtype, device=x.device)
    _launch(x, weight, eps, out, rows=rows, count=count)
    return out


def rms_norm_split(x, weight, eps, slot, num_rows):
    out = torch.empty_like(x)
    outq = torch.empty(num_rows, x.shape[1], dtype=x.dtype, device=x.device)
    _launch(x, weight, eps, out, slot=slot, outq=outq)
    return out, outq
