"""Test-session setup shared by every module.

Without a GPU, the Triton kernels run in Triton's interpreter (`TRITON_INTERPRET=1`, CPU
tensors, float32): the fast path's kernels are then checked against the reference on every
machine, not only on the GPU. It must be set before any kernel is defined (import time).
"""
import importlib.util
import os

import torch

if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def startup_cache_dir(tmp_path_factory) -> str:
    """One start-up cache (`cache_dir` / `compile_cache_dir`) for the session: the embedded
    default GGUF is converted once (about 30 s on two cores), not by every test that loads it."""
    return str(tmp_path_factory.mktemp("startup-cache"))
