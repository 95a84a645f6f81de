import os

import pytest
import torch

# Triton decides at decoration time whether kernels run in its interpreter, so this must be set
# before skipgpt is imported. Without CUDA the kernels run on CPU tensors (fp32/fp16 only: the
# interpreter computes bf16 wrongly).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
