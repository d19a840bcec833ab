"""Compile every Triton kernel launch for real NVIDIA GPUs, on a machine without one, and report what
the compiler made of it: registers and spills per thread, shared memory, tensor-core instructions.
Every configuration of every autotuning space (kernels/tuning.py) is compiled, one launch each.

    python bench/compile_kernels.py                       # sm_90 (H100/H200), sm_80 (A100), sm_89 (L40, RTX 4090)
    python bench/compile_kernels.py --arch 90 --quick     # a few launches per kernel
    python bench/compile_kernels.py --out bench/results/compile

Triton's interpreter (TRITON_INTERPRET=1, how the tests run kernels on CPU) never runs the real
compiler, so a kernel that the interpreter accepts can still fail to compile, run out of shared
memory or spill registers on a GPU. Here the kernels' own launchers run on CPU tensors with a
stand-in for Triton's CUDA driver that names the target architecture; each launch is compiled down
to a cubin with the ptxas that ships with triton, and never run. The resources come from
cuobjdump's report on that cubin.

For attention launches it also counts, in the compiled SASS, the tensor-core (HGMMA on sm_90, HMMA
before) and exponential (MUFU.EX2) instructions, and turns them into the work done per score tile: the
tensor-core multiply-adds of one loop iteration divided by held x streamed x head-dim block gives the
matmuls per score tile (by design: forward 2; one-pass backward 5; deterministic backward 4 + 3), and the
MUFU.EX2 instructions of all threads divided by held x streamed the exponentials per score (1 per kernel
by design, a little more in the forward for the rescaling). A count above the design's means the compiled
loop does part of the work twice. Exit status 1 if any launch fails to compile, spills more than a few
registers or needs more shared memory than the architecture gives one block.
"""
import argparse
import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kernels.common import interpreter_enabled  # noqa: E402

if interpreter_enabled():
    sys.exit("bench/compile_kernels.py compiles for real GPUs: run it without TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from bench import common  # noqa: E402
from kernels.tuning import attention_space, cross_entropy_space, norm_warps  # noqa: E402

# Dynamic shared memory one block may use, in bytes (CUDA programming guide, compute capabilities).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# Spilled bytes per thread tolerated. A few registers' worth (which ptxas versions spill or not, as
# the same kernel sits near the 255-register cap) costs little; hundreds of bytes mean the tiles are
# too big for the register file, and every loop iteration then goes through local memory.
SPILL_LIMIT = 64
ARCH_NAMES = {80: "sm_80 (A100)", 86: "sm_86 (RTX 30xx, A10)", 89: "sm_89 (L40, RTX 40xx)", 90: "sm_90 (H100, H200)"}
KERNEL_MODULES = ("kernels.flash_attention", "kernels.layernorm", "kernels.cross_entropy")


class CompileOnlyDriver:
    """Just enough of Triton's active driver for JITFunction to pick a target and compile for it."""

    def __init__(self, capability: int):
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


@dataclass
class Launch:
    kernel: str
    case: str
    tiles: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    tensor_cores: str
    mma_instructions: int = 0
    ex2_instructions: int = 0
    matmuls_per_tile: float | None = None
    exp2_per_score: float | None = None
    error: str = ""


def _cuobjdump(cubin: bytes) -> str:
    """cuobjdump's resource usage and SASS listing of a cubin, in one run."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(cuobjdump), "-res-usage", "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout


def _resource_usage(report: str) -> tuple[int, int]:
    """(registers per thread, stack + local bytes per thread) from cuobjdump's report.

    Registers that do not fit are spilled to the thread's stack frame, which lives in (slow) local memory;
    these kernels keep no arrays there, so the stack is counted as spills."""
    match = re.search(r"REG:(\d+) STACK:(\d+) .*LOCAL:(\d+)", report)
    if match is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{report}")
    return int(match.group(1)), int(match.group(2)) + int(match.group(3))


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_HGMMA = re.compile(r"\bHGMMA\.(\d+)x(\d+)x(\d+)")
_HMMA = re.compile(r"\bHMMA\.(16)(8)(16|8)\b")
_EX2 = re.compile(r"\bMUFU\.EX2\b")


def _work(instructions: list[str], warps: int) -> tuple[int, int, int]:
    """(tensor-core instructions, MUFU.EX2 instructions, multiply-adds the tensor-core ones do, all threads).

    HGMMA.MxNxK is issued by a warpgroup (4 warps) for an MxNxK product; HMMA.16816 / HMMA.1688 by each
    warp for m16 n8 k16 / k8."""
    text = "\n".join(instructions)
    hgmma, hmma = _HGMMA.findall(text), _HMMA.findall(text)
    macs = sum(int(m) * int(n) * int(k) for m, n, k in hgmma) * (warps // 4)
    macs += sum(int(m) * int(n) * int(k) for m, n, k in hmma) * warps
    return len(hgmma) + len(hmma), len(_EX2.findall(text)), macs


def sass_work(sass: str, warps: int) -> tuple[int, int, tuple[float, float] | None]:
    """Tensor-core and MUFU.EX2 instructions in a SASS listing, and (multiply-adds, exponentials) of one
    iteration of its tile loops, averaged over them (None if no loop has either).

    A tile loop is a backward branch whose body holds tensor-core or EX2 instructions and that sits in no
    other such loop: the masked and unmasked copies of a kernel's loop are two. Work outside the loops
    (a pipelined loop's peeled first or last iteration, the forward's final rescale) is not counted."""
    lines = [(int(address, 16), text) for address, text in _SASS_LINE.findall(sass)]
    mma_total, ex2_total, _ = _work([text for _, text in lines], warps)
    loops = []
    for address, text in lines:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:
            body = [t for a, t in lines if int(target.group(1), 16) <= a <= address]
            mma, ex2, macs = _work(body, warps)
            if mma or ex2:
                loops.append((int(target.group(1), 16), address, macs, ex2 * 32 * warps))
    outer = [loop for loop in loops
             if not any(o is not loop and o[0] <= loop[0] and loop[1] <= o[1] for o in loops)]
    if not outer:
        return mma_total, ex2_total, None
    return (mma_total, ex2_total,
            (sum(o[2] for o in outer) / len(outer), sum(o[3] for o in outer) / len(outer)))


def _tensor_cores(ttgir: str) -> str:
    if "warp_group_dot" in ttgir:
        return "wgmma"
    if "nvidia_mma" in ttgir:
        return "mma"
    return "-"


class Recorder:
    """Replaces JITFunction.run while active: every launch is compiled (warmup=True) and recorded."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.case = ""
        self._run = JITFunction.run

    def __enter__(self):
        recorder = self

        def compile_only(kernel, *args, grid, warmup, **kwargs):
            try:
                compiled = recorder._run(kernel, *args, grid=grid, warmup=True, **kwargs)
            except Exception as e:  # a compile error is a result to report, not a crash
                first_line = (str(e).splitlines() or [""])[0][:200]
                recorder.launches.append(Launch(kernel.fn.__name__, recorder.case, "", 0, 0, 0, "",
                                                f"{type(e).__name__}: {first_line}"))
                return None
            recorder.record(kernel.fn.__name__, kwargs, compiled)
            return compiled

        JITFunction.run = compile_only
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._run

    def record(self, name, kwargs, compiled):
        blocks = " ".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in kwargs.items() if k in ("BLOCK_M", "BLOCK_N"))
        warps = compiled.metadata.num_warps
        tiles = f"{blocks} w{warps} s{compiled.metadata.num_stages}"
        report = _cuobjdump(compiled.asm["cubin"])
        registers, spills = _resource_usage(report)
        launch = Launch(name, self.case, tiles, registers, spills, compiled.metadata.shared,
                        _tensor_cores(compiled.asm["ttgir"]))
        launch.mma_instructions, launch.ex2_instructions, per_iteration = sass_work(report, warps)
        if {"BLOCK_M", "BLOCK_N", "BLOCK_D"} <= kwargs.keys() and per_iteration:  # attention: per score tile
            # without tensor cores (fp32 without TF32) the matmuls are FFMAs, not counted: "-"
            tile = kwargs["BLOCK_M"] * kwargs["BLOCK_N"]
            if launch.mma_instructions:
                launch.matmuls_per_tile = round(per_iteration[0] / (tile * kwargs["BLOCK_D"]), 2)
            launch.exp2_per_score = round(per_iteration[1] / tile, 2)
        self.launches.append(launch)


# --quick: every dtype, head-dim class, mask, dropout and fp32 matmul precision at least once.
QUICK_ATTENTION = [(torch.bfloat16, 64, True, False, 0.0, False), (torch.bfloat16, 128, True, True, 0.1, False),
                   (torch.float16, 40, False, False, 0.1, False), (torch.float32, 64, True, True, 0.0, True),
                   (torch.float32, 128, False, False, 0.1, False)]
# (dtype, width, mode): mode is "bias" or "no bias" for LayerNorm, or "rms" for RMSNorm (never a bias).
QUICK_NORM = [(torch.bfloat16, 768, "bias"), (torch.float32, 1600, "no bias"), (torch.float16, 5000, "bias"),
              (torch.bfloat16, 20000, "no bias"), (torch.float16, 768, "rms"), (torch.bfloat16, 20000, "rms")]


def _first_if(quick: bool, space: tuple) -> tuple:
    """--quick compiles one configuration of each autotuning space, the full run all of them."""
    return space[:1] if quick else space


def _attention_cases(quick: bool):
    """(dtype, head dim, causal, masked, dropout_p, allow TF32) for each attention case to compile; masked:
    documents and a window (causal only). The spaces depend on the head-dim block being over 64 or not; 80
    is a non-power-of-two width."""
    if quick:
        return QUICK_ATTENTION
    return [(dtype, head_dim, causal, masked, dropout_p, tf32)
            for dtype in (torch.bfloat16, torch.float16, torch.float32)
            for head_dim in (16, 64, 80, 128)
            for causal, masked in ((True, False), (False, False), (True, True))
            for dropout_p in (0.0, 0.1)
            for tf32 in ((False, True) if dtype == torch.float32 else (False,))]


def compile_attention(recorder: Recorder, quick: bool, capability: int):
    """Every tiling of the forward's space, of the one-pass backward's and of the deterministic backward's."""
    fa = importlib.import_module(KERNEL_MODULES[0])
    for dtype, head_dim, causal, masked, dropout_p, tf32 in _attention_cases(quick):
        # fp32 tiles depend on whether matmuls may use TF32, as torch's own do.
        torch.backends.cuda.matmul.allow_tf32 = tf32
        # T = 1000: not a multiple of any tile, so the launch is specialized as a general length.
        q = torch.empty(2, 3, 1000, head_dim, dtype=dtype)
        seed = torch.tensor([1234]) if dropout_p else None
        starts, ends, window = (torch.zeros(2, 1000, dtype=torch.int32),) * 2 + (256,) if masked else (None, None, 0)
        case = (f"{str(dtype).removeprefix('torch.')}{' tf32' if tf32 else ''} D={head_dim}"
                f"{' causal' if causal else ''}{' documents+window' if masked else ''}"
                f"{f' dropout={dropout_p}' if dropout_p else ''}")
        space = {kernel: _first_if(quick, attention_space(kernel, fa._block_d(head_dim), dtype, dropout_p > 0,
                                                          capability, tf32))
                 for kernel in ("forward", "backward", "deterministic")}
        recorder.case = case
        for tiles in space["forward"]:
            _, lse = fa._forward(q, q, q, causal, head_dim ** -0.5, dropout_p, seed, starts, window, tiles)
        for design in ("backward", "deterministic"):
            recorder.case = f"{case} {'one-pass' if design == 'backward' else 'deterministic'}"
            for tiles in space[design]:
                fa._backward(q, q, q, q, q, lse, causal, head_dim ** -0.5, dropout_p, seed, starts, ends, window,
                             design == "deterministic", tiles)


def compile_norm(recorder: Recorder, quick: bool):
    ln = importlib.import_module(KERNEL_MODULES[1])
    cases = QUICK_NORM if quick else [
        (dtype, width, mode)
        for dtype in (torch.bfloat16, torch.float16, torch.float32)
        for width in (768, 1024, 1600, 5000, 16384, 20000)
        for mode in ("bias", "no bias", "rms")]
    for dtype, width, mode in cases:
        recorder.case = f"{str(dtype).removeprefix('torch.')} N={width}{'' if mode == 'bias' else ' ' + mode}"
        x = torch.empty(64, width, dtype=dtype)
        weight = torch.empty(width, dtype=dtype)
        bias = torch.empty(width, dtype=dtype) if mode == "bias" else None
        for warps in _first_if(quick, norm_warps(ln._block(width, ln._FWD_MAX_BLOCK_N))):
            _, mean, rstd = ln._forward(x, weight, bias, 1e-5, rms=mode == "rms", warps=warps)
        for warps in _first_if(quick, norm_warps(ln._block(width, ln._BWD_MAX_BLOCK_N))):
            ln._backward(x, x, weight, mean, rstd, bias, warps=warps)


def compile_cross_entropy(recorder: Recorder, quick: bool):
    ce = importlib.import_module(KERNEL_MODULES[2])
    cases = [(dtype, vocab, cap) for dtype in (torch.bfloat16, torch.float16, torch.float32)
             for vocab in (50257, 50304, 128256) for cap in (0.0, 15.0)]
    for dtype, vocab, cap in (cases[::4] if quick else cases):
        recorder.case = f"{str(dtype).removeprefix('torch.')} V={vocab}{f' softcap={cap:g}' if cap else ''}"
        logits = torch.empty(8, vocab, dtype=dtype)
        for config in _first_if(quick, cross_entropy_space(vocab)):
            ce.loss_and_logit_grads(logits, torch.zeros(8, dtype=torch.long), torch.empty(8), torch.ones(1), cap, -1,
                                    config)


def problems(launch: Launch, capability: int) -> list[str]:
    found = [launch.error] if launch.error else []
    if launch.spill_bytes > SPILL_LIMIT:
        found.append(f"spills {launch.spill_bytes} bytes per thread to local memory (over {SPILL_LIMIT})")
    if launch.shared_bytes > SHARED_LIMIT[capability]:
        found.append(f"needs {launch.shared_bytes} bytes of shared memory, over the {SHARED_LIMIT[capability]} "
                     f"a block gets on {ARCH_NAMES[capability]}")
    return found


def compile_all(capability: int, quick: bool) -> list[Launch]:
    # This process never talks to a real driver, so the stand-in need not be taken back out.
    driver.set_active(CompileOnlyDriver(capability))
    for module in KERNEL_MODULES:
        for value in vars(importlib.import_module(module)).values():
            if isinstance(value, JITFunction):
                value.device_caches.clear()  # each kernel caches the target it was first compiled for
    with Recorder() as recorder:
        compile_attention(recorder, quick, capability)
        compile_norm(recorder, quick)
        compile_cross_entropy(recorder, quick)
    return recorder.launches


def _or_dash(value):
    return "-" if value is None else value


def backward_work(rows: list[dict]) -> list[str]:
    """One line per architecture: the range, over its fp16/bf16 launches, of the attention backward's matmuls
    and exponentials per score tile in each design (the one-pass kernel; the deterministic dK/dV kernel and
    the dQ kernel launched after it, added)."""
    lines = []
    for arch in dict.fromkeys(row["arch"] for row in rows):
        launches = [r for r in rows if r["arch"] == arch and r["matmuls/tile"] != "-" and "float32" not in r["case"]
                    and r["kernel"] in ("bwd_dkdv_kernel", "bwd_dq_kernel")]
        one_pass = [(r["matmuls/tile"], r["exp2/score"]) for r in launches if r["case"].endswith("one-pass")]
        pairs = [r for r in launches if r["case"].endswith("deterministic")]
        deterministic = [(a["matmuls/tile"] + b["matmuls/tile"], a["exp2/score"] + b["exp2/score"])
                         for a, b in zip(pairs[::2], pairs[1::2])]
        ranges = []
        for design, work in (("one-pass", one_pass), ("deterministic", deterministic)):
            if work:
                matmuls, exps = [m for m, _ in work], [e for _, e in work]
                ranges.append(f"{design} {_span(matmuls)} matmuls and {_span(exps)} exp2 per score")
        if ranges:
            lines.append(f"{arch} attention backward per score tile, fp16/bf16 launches: " + "; ".join(ranges))
    return lines


def _span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:g}" if low == high else f"{low:g}-{high:g}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80, 89], choices=sorted(SHARED_LIMIT),
                   help="compute capabilities to compile for, e.g. 90 for sm_90 (default: 90 80 89)")
    p.add_argument("--quick", action="store_true",
                   help="a few cases per kernel, one configuration of each autotuning space, instead of all")
    p.add_argument("--out", type=Path, help="also write compile_kernels.md and .json in this directory")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="architectures compiled at once")
    args = p.parse_args(argv)

    rows, failures = [], []
    # One process per architecture (each sets its own stand-in driver), as many at a time as there are cores.
    with multiprocessing.get_context("fork").Pool(min(len(args.arch), args.jobs)) as pool:
        results = pool.starmap(compile_all, [(capability, args.quick) for capability in args.arch])
    for capability, launches in zip(args.arch, results):
        for launch in launches:
            found = problems(launch, capability)
            failures += [f"{ARCH_NAMES[capability]} {launch.kernel} [{launch.case}]: {f}" for f in found]
            rows.append({"arch": f"sm_{capability}", "kernel": launch.kernel.strip("_"), "case": launch.case,
                         "tiles": launch.tiles, "registers": launch.registers, "spill bytes": launch.spill_bytes,
                         "shared KiB": round(launch.shared_bytes / 1024, 1), "tensor cores": launch.tensor_cores,
                         "mma instr": launch.mma_instructions, "ex2 instr": launch.ex2_instructions,
                         "matmuls/tile": _or_dash(launch.matmuls_per_tile),
                         "exp2/score": _or_dash(launch.exp2_per_score),
                         "ok": "no: " + "; ".join(found) if found else "yes"})
    settings = {"architectures": ", ".join(ARCH_NAMES[a] for a in args.arch), "cases": "quick" if args.quick else "all"}
    notes = ["compiled to cubins with the ptxas that ships with triton, on a machine without a GPU; never run",
             "tiles: BLOCK_M (query rows) and BLOCK_N (key rows; for LayerNorm and RMSNorm, the row block), w = warps, s = pipeline stages",
             "shared KiB is what the block asks for; the limit is 227 KiB on sm_90, 163 on sm_80, 99 on sm_86/89",
             "mma instr / ex2 instr: tensor-core (HGMMA, HMMA) and MUFU.EX2 instructions in the SASS; matmuls/tile and "
             "exp2/score: the work of one loop iteration per score tile, from those (see the module docstring)",
             *backward_work(rows)]
    common.report("compile_kernels", "Triton kernel launches compiled for GPU targets", rows, list(rows[0]),
                  settings, notes, args.out)
    for failure in failures:
        print("FAIL", failure, file=sys.stderr)
    print(f"{len(rows)} launches compiled with triton {triton.__version__}: {len(failures)} problems")
    return 1 if failures else 0

if __name__ == "__main__":
    sys.exit(main())
