"""Test-wide setup.

Triton kernels run on the GPU when there is one; otherwise in Triton's interpreter, which must be
switched on before triton is first imported, so this happens here, ahead of every test module.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Offline copies for tests only: the product itself downloads from the real URLs.
if (SHARED / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
if (SHARED / "data").is_dir():
    os.environ.setdefault("TRITONGPT_MIRROR", str(SHARED / "data"))

# The device where kernel tests run: the GPU, or the CPU under the interpreter.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on CPU")
    config.addinivalue_line("markers", "extra: another variant of a multi-process layout that a test in the default "
                                       "run covers already; run with --extra (2 CPU cores make these slow)")


def pytest_addoption(parser):
    parser.addoption("--extra", action="store_true", help="also run the tests marked extra")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_extra = pytest.mark.skip(reason="a variant of a covered layout: run with --extra")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "extra" in item.keywords and not config.getoption("--extra"):
            item.add_marker(skip_extra)
