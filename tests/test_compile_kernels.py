"""Every kernel compiled by Triton's real compiler, down to cubins for sm_90, sm_80 and sm_89, on this
machine without a GPU (bench/compile_kernels.py). The interpreter that runs the other kernel tests on
CPU never invokes that compiler, so this is where a kernel that cannot compile, needs more shared
memory than a GPU has or spills more than a few registers is caught."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import triton

REPO = Path(__file__).resolve().parent.parent
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton build has no NVIDIA backend (no ptxas)")
def test_kernels_compile_for_gpus_within_shared_memory_and_registers(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile now, not from an earlier run's cache
    result = subprocess.run([sys.executable, "bench/compile_kernels.py", "--quick", "--arch", "90", "80", "89"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert re.search(r"\b\d+ launches compiled with triton .*: 0 problems", output), output[-2000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| sm_")]
    kernels = {row[1].strip() for row in rows}
    assert {"fwd_kernel", "bwd_dkdv_kernel", "bwd_dq_kernel", "bwd_kernel", "bwd_chunked_kernel"} <= kernels
    # The attention matmuls must reach the tensor cores: wgmma on Hopper, mma before it.
    tensor_cores = {(row[0].strip(), row[7].strip()) for row in rows if row[1].strip() == "fwd_kernel"}
    assert ("sm_90", "wgmma") in tensor_cores and ("sm_80", "mma") in tensor_cores
    # The attention backward's work, counted in the SASS (matmuls per score tile, exponentials per score): the
    # one-pass kernel does FlashAttention-2's 5 and 1, the deterministic pair 4 + 3 and 1 + 1.
    def work(case):
        return {(row[0].strip(), row[1].strip()): (row[10].strip(), row[11].strip()) for row in rows
                if row[2].strip() == case}

    one_pass, deterministic = work("bfloat16 D=64 causal one-pass"), work("bfloat16 D=64 causal deterministic")
    for arch in ("sm_90", "sm_80", "sm_89"):
        assert one_pass[(arch, "bwd_dkdv_kernel")] == ("5", "1")
        assert deterministic[(arch, "bwd_dkdv_kernel")] == ("4", "1")
        assert deterministic[(arch, "bwd_dq_kernel")] == ("3", "1")
