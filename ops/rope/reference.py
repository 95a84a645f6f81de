"""Pure-PyTorch rotary embedding (Hugging Face's rotate-half convention) and the seq-first
KV-cache write it feeds."""
from typing import Optional

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: Optional[torch.Tensor] = None,
    count: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x [M, Hx, D], cos/sin [T, D] -> [M, Hx, D]; row m rotates with cos/sin[rows[m]] (row m
    without rows; table row 0 for an index outside [0, T), as the kernel does). With `count`,
    rows m >= count are zero (unspecified in Triton)."""
    if rows is None:
        src = slice(None)
    else:
        src = torch.where((rows >= 0) & (rows < cos.shape[0]), rows, 0).long()
    c, s = cos[src][:, None, :], sin[src][:, None, :]
    # cos/sin may be wider than x (fp32 tables): the result keeps x's dtype, as the fake and
    # the Triton kernel do.
    out = (x * c + rotate_half(x) * s).to(x.dtype)
    if count is not None:
        valid = torch.arange(x.shape[0], device=x.device) < count.to(x.device)
        out = torch.where(valid[:, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def rope_kv_write_reference(k, v, cos, sin, k_cache, v_cache, start) -> None:
    """k/v [B, L, Hk, D], cos/sin [B, L, D], caches [B, S, Hk, D], start [1] int64: writes
    rope(k) and v into the caches at sequence slots start .. start+L-1 (in place)."""
    B, L, Hk, D = k.shape
    first = int(start.reshape(-1)[0])
    if first < 0 or first + L > k_cache.shape[1]:
        raise ValueError(f"start: slots {first}..{first + L - 1} fall outside a cache of {k_cache.shape[1]} slots")
    rotated = rope_reference(k.reshape(B * L, Hk, D), cos.reshape(B * L, D), sin.reshape(B * L, D))
    k_cache[:, first : first + L] = rotated.view(B, L, Hk, D)
    v_cache[:, first : first + L] = v
