"""Shared by the tests: the device Triton kernels run on here, and error measures."""
import torch

from skipgpt.ops._common import HAS_TRITON

# Triton kernels run on CUDA, or through the interpreter on CPU tensors (set in conftest).
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so rows a kernel forgot to write are caught."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)


def random_execute(R, B, L, p, generator=None, device="cpu"):
    return torch.rand(R, B, L, generator=generator, device=device) < p


def requires_triton(fn):
    import pytest

    return pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")(fn)
