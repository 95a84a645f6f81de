"""skipgpt: fast SkipGPT inference for Hugging Face Llama-family models.

    model = skipgpt.load("path/to/hf-model", router="router.pth", pipeline="triton-sparse")
    skipgpt.set_pipeline(model, "dense"); skipgpt.force_routes(model, skip=0.25)
    print(skipgpt.sparsity(model))
"""
from . import ops  # noqa: F401  (registers torch.ops.skipgpt)
from .cache import SeqFirstCache
from .layer import PIPELINES, RoutedDecoderLayer
from .model import force_routes, load, reset_sparsity, set_pipeline, sparsity, wrap

__version__ = "0.1.0"
__all__ = [
    "PIPELINES",
    "RoutedDecoderLayer",
    "SeqFirstCache",
    "force_routes",
    "load",
    "reset_sparsity",
    "set_pipeline",
    "sparsity",
    "wrap",
]
