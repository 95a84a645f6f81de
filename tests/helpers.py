"""Shared by the tests: the device Triton kernels run on here, error measures, and what
torch.compile logs about the kernels."""
import contextlib
import logging

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


@contextlib.contextmanager
def kernel_write_analysis_failures():
    """Collects (as a list of strings) each time torch.compile fails to read from a Triton
    kernel's IR which arguments it writes. PyTorch then takes every argument as written (the
    graph copies them) and only logs a warning, on the torch._dynamo logger."""
    failures = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.pathname.endswith("triton_kernel_wrap.py") or "identify_" in record.getMessage():
                error = f": {record.exc_info[1]!r}" if record.exc_info else ""
                failures.append(record.getMessage() + error)

    logger, handler = logging.getLogger("torch._dynamo"), Collect(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield failures
    finally:
        logger.removeHandler(handler)
