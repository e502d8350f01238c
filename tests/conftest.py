import os

import pytest
import torch

# Reference ops by default on CPU; kernel tests set SALA_KERNELS themselves.
os.environ.setdefault("SALA_KERNELS", "auto")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
