"""Test-wide setup.

Triton kernels run on the GPU when there is one; otherwise in Triton's interpreter, which must be
switched on before triton is first imported, so this happens here, ahead of every test module.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# The offline copies beside the checkout, or inside it (an ignored shared/ folder: how they reach a borrowed
# GPU machine, which receives the working tree only).
SHARED = next((path for path in (REPO.parent / "shared", REPO / "shared") if path.is_dir()), REPO.parent / "shared")
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


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """A directory holding data/shakespeare_char, made by the real prepare script: where train.py runs."""
    root = tmp_path_factory.mktemp("train")
    subprocess.run([sys.executable, str(REPO / "prepare" / "shakespeare_char.py")], cwd=root, check=True,
                   capture_output=True, timeout=300)
    return root


def pytest_configure(config):
    record_results_if_asked(config)
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on CPU")
    config.addinivalue_line("markers", "extra: another variant of a multi-process layout that a test in the default "
                                       "run covers already; run with --extra (2 CPU cores make these slow)")


def pytest_addoption(parser):
    parser.addoption("--extra", action="store_true", help="also run the tests marked extra")
    parser.addoption("--results", type=Path, help="append each test's outcome (and a failure's traceback) to this "
                                                  "JSON-lines file as it finishes: a run cut short keeps them")


RESULTS: dict[str, Path] = {}  # "path": where --results writes, in the process that reports


def record_results_if_asked(config):
    path = config.getoption("--results")
    # under pytest-xdist the workers send their reports to the controlling process, which writes them all
    if path is not None and not hasattr(config, "workerinput"):
        RESULTS["path"] = path


def pytest_runtest_logreport(report):
    """With --results: a line for each finished test, and for a setup or teardown that did not pass."""
    if "path" not in RESULTS or (report.when != "call" and report.outcome == "passed"):
        return
    record = {"test": report.nodeid, "phase": report.when, "outcome": report.outcome,
              "seconds": round(report.duration, 3)}
    if report.outcome == "failed":
        record["traceback"] = report.longreprtext
    elif report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        record["reason"] = report.longrepr[2]
    with open(RESULTS["path"], "a") as f:
        f.write(json.dumps(record) + "\n")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_extra = pytest.mark.skip(reason="a variant of a covered layout: run with --extra")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "extra" in item.keywords and not config.getoption("--extra"):
            item.add_marker(skip_extra)
