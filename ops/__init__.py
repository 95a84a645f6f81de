"""skipgpt.ops: SkipGPT's kernels as torch.library custom ops (namespace `torch.ops.skipgpt`).

One subpackage per op family, each with a pure-PyTorch `reference.py` (the CPU implementation),
Triton `kernels.py` (the CUDA implementation) and the op registration in its `__init__.py`.
"""
from .attention import sparse_attention
from .linear import gated_mlp, linear_residual, linear_rows, qkv_rope_write
from .norm import rms_norm, rms_norm_split
from .rope import rope, rope_kv_write
from .routing import compact, counts_to_host, exact_rows, forced_execute, router_execute

__all__ = [
    "router_execute",
    "forced_execute",
    "compact",
    "counts_to_host",
    "exact_rows",
    "rms_norm",
    "rms_norm_split",
    "rope",
    "rope_kv_write",
    "sparse_attention",
    "linear_rows",
    "gated_mlp",
    "linear_residual",
    "qkv_rope_write",
]
