"""skipgpt: fast SkipGPT inference for Hugging Face Llama-family models."""
from . import ops  # noqa: F401  (registers torch.ops.skipgpt)

__version__ = "0.1.0"
