"""Pure-PyTorch RMSNorm, rounded the way Hugging Face's Llama RMSNorm rounds."""
from typing import Optional

import torch


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    rows: Optional[torch.Tensor] = None,
    count: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x [T, H], weight [H] -> [M, H]: row m normalises x[rows[m]] (x[m] without rows).

    With `count`, only rows m < count are computed; the rest are zero here and unspecified in
    the Triton implementation. A row index outside [0, T) reads a zero row, as the kernel does.
    """
    if rows is None:
        src = x
    else:
        valid = (rows >= 0) & (rows < x.shape[0])
        src = x[torch.where(valid, rows, 0).long()] if x.shape[0] else x.new_zeros(rows.shape[0], x.shape[1])
        src = torch.where(valid[:, None], src, torch.zeros((), dtype=x.dtype, device=x.device))
    xf = src.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * y.to(x.dtype)
    if count is not None:
        valid = torch.arange(y.shape[0], device=y.device) < count.to(y.device)
        y = torch.where(valid[:, None], y, torch.zeros((), dtype=y.dtype, device=y.device))
    return y


def rms_norm_split_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, slot: torch.Tensor, num_rows: int):
    """x [T, H] -> (y [T, H] every row normalised, yq [num_rows, H] with yq[slot[t]] = y[t] for
    0 <= slot[t] < num_rows). Rows of yq no token maps to are zero here, unspecified in Triton."""
    y = rms_norm_reference(x, weight, eps)
    yq = torch.zeros(num_rows + 1, x.shape[1], dtype=y.dtype, device=y.device)
    target = torch.where((slot >= 0) & (slot < num_rows), slot, num_rows).long()
    yq.scatter_(0, target[:, None].expand_as(y), y)  # skipping tokens land in the cut-off spill row
    return y, yq[:num_rows]
