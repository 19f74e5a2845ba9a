"""Shared test set-up: Triton's interpreter on CPU machines, GPU marker handling."""

import os

import pytest
import torch

# Triton kernels run on CPU tensors only through the interpreter, which must be switched on
# before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
