"""LayerNorm: how close does our Triton kernel come to the memory bandwidth, and to PyTorch?

    python bench/layernorm.py                         # the full sweep, on the GPU, in bfloat16
    python bench/layernorm.py --mode fwd+bwd --width 768 1024 1280 1600 --out bench/results
    python bench/layernorm.py --quick                 # a few seconds, on CPU too

Implementations: `triton` (kernels/layernorm.py; CUDA only), `torch` (F.layer_norm) and
`torch.compile` (F.layer_norm under torch.compile, which generates its own fused Triton kernels on a
GPU). Inputs are 4096 rows of N columns, N from 512 to 16384 with GPT-2's widths (768, 1024, 1280,
1600) among them, and a weight and bias in the same dtype. A layer norm has little arithmetic, so
GB/s is the measure, and the ceiling is a device-to-device copy, timed in the same run. Without
CUDA the widths stop at 2048, and the Triton rows are skipped.
"""
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch._functorch.config  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import common  # noqa: E402

IMPLS = ("triton", "torch", "torch.compile")
MODES = ("fwd", "bwd", "fwd+bwd")
EPS = 1e-5  # the model's
# The sweep by run size: "gpu", "cpu" (no CUDA) or "quick" (--quick)
WIDTHS = {
    "gpu": (512, 768, 1024, 1280, 1600, 2048, 4096, 8192, 16384),
    "cpu": (512, 768, 1024, 1280, 1600, 2048),
    "quick": (768, 1600),
}
ROWS = {"gpu": 4096, "cpu": 4096, "quick": 64}
COPY_BYTES = {"gpu": 2**30, "cpu": 2**27, "quick": 2**22}  # far larger than the caches, except for --quick
REP_MS = {"gpu": 100.0, "cpu": 100.0, "quick": 5.0}
COLUMNS = ("impl", "mode", "M", "N", "ms", "GB_s", "pct_copy", "vs_torch", "vs_compile", "note")


def layernorm_bytes(rows: int, width: int, itemsize: int, mode: str) -> int:
    """Bytes that must move between memory and the chip, with weight and bias in the inputs' dtype.
    Forward: read x, write y (rows x width each), read weight and bias. Backward: read x and dy, write
    dx, read weight, write dweight and dbias. The saved row statistics are left out: they are optional
    (they can be recomputed from x) and small."""
    forward = (2 * rows * width + 2 * width) * itemsize
    backward = (3 * rows * width + 3 * width) * itemsize
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[mode]


def gb_per_s(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def torch_layer_norm(x, weight, bias):
    return F.layer_norm(x, weight.shape, weight, bias, EPS)


def implementations(names: list[str], device: str) -> dict:
    """Name -> a function returning the implementation for one width (torch.compile's is compiled anew
    for each, so every width gets its own specialized kernels)."""
    def compiled():
        torch._dynamo.reset()  # else the recompiles for each width hit dynamo's cache limit
        # bwd times one backward over a kept graph, again and again (retain_graph). A compiled backward
        # that donates the saved tensors' memory to its outputs refuses that; donation saves memory, not time.
        torch._functorch.config.donated_buffer = False
        return torch.compile(torch_layer_norm, dynamic=False)

    makers = {"torch": lambda: torch_layer_norm, "torch.compile": compiled}
    if device.startswith("cuda"):
        from kernels.layernorm import layer_norm  # imported here: runs without CUDA need no Triton

        makers["triton"] = lambda: functools.partial(layer_norm, eps=EPS)
    return {name: makers[name] for name in names if name in makers}


def copy_bandwidth(device: str, nbytes: int, rep_ms: float) -> float:
    """GB/s of a device-to-device copy of nbytes (counting the read and the write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return gb_per_s(2 * nbytes, common.time_ms(lambda: dst.copy_(src), device, rep_ms))


def make_inputs(rows: int, width: int, device: str, dtype: torch.dtype):
    """x, weight, bias (leaves that take gradients) and an output gradient."""
    torch.manual_seed(0)
    x, weight, bias = (torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
                       for shape in ((rows, width), (width,), (width,)))
    return (x, weight, bias), torch.randn(rows, width, device=device, dtype=dtype)


def reference(inputs: tuple, dy: torch.Tensor):
    """y and the gradients of x, weight and bias in float32."""
    inputs32 = [t.detach().float().requires_grad_() for t in inputs]
    y = torch_layer_norm(*inputs32)
    return y.detach(), torch.autograd.grad(y, inputs32, dy.float())


def bench_width(makers: dict, rows: int, width: int, modes: list[str], device: str, dtype: str, copy_gbs: float,
                rep_ms: float) -> list[dict]:
    inputs, dy = make_inputs(rows, width, device, getattr(torch, dtype))
    ref_y, ref_grads = reference(inputs, dy)
    results = []
    for name, make in makers.items():
        fn = make()
        for mode in modes:
            expected = (ref_y,) if mode == "fwd" else ref_grads
            result, note = common.attempt(functools.partial(common.run_case, fn, inputs, dy, mode, expected, device, rep_ms))
            ms, _, error = result or (None, None, None)
            if error is not None:
                note = common.mismatch_note(error, dtype)
            gbs = gb_per_s(layernorm_bytes(rows, width, dy.element_size(), mode), ms) if ms else None
            results.append({
                "impl": name, "mode": mode, "M": rows, "N": width, "ms": ms, "GB_s": gbs,
                "pct_copy": 100 * gbs / copy_gbs if gbs else None, "error": error, "note": note,
            })
    return results


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--impl", nargs="+", choices=IMPLS, help="default: all three (without torch.compile under --quick)")
    p.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--width", nargs="+", type=int, help="N values (default: 512 to 16384 on GPU)")
    p.add_argument("--rows", type=int, help="M (default: 4096)")
    args = p.parse_args(argv)

    device, dtype = common.device_and_dtype(args)
    size = common.sweep_size(args, device)
    widths = args.width or list(WIDTHS[size])
    rows = args.rows or ROWS[size]
    # compiling takes longer than a quick run should, most of all on CPU (C++ code generation)
    names = args.impl or [name for name in IMPLS if not (args.quick and name == "torch.compile")]
    makers = implementations(names, device)
    notes = []
    if "triton" in names and "triton" not in makers:
        notes.append("triton: not run; the Triton kernels need a CUDA GPU")
        print(notes[-1], file=sys.stderr)
    copy_gbs = copy_bandwidth(device, COPY_BYTES[size], REP_MS[size])
    common.free_memory()

    results = []
    for width in widths:
        print(f"M={rows} N={width}", file=sys.stderr, flush=True)
        results += bench_width(makers, rows, width, args.mode, device, dtype, copy_gbs, REP_MS[size])
        common.free_memory()
    common.add_ratio(results, "vs_torch", "ms", "torch", ("mode", "M", "N"))
    common.add_ratio(results, "vs_compile", "ms", "torch.compile", ("mode", "M", "N"))

    settings = {
        "device": device, "dtype": dtype, "rows (M)": rows,
        "copy bandwidth (GB/s)": copy_gbs, "copy size (MiB)": COPY_BYTES[size] / 2**20,
        "timing": "triton.testing.do_bench median, L2 flushed" if device.startswith("cuda") else "wall-clock median",
    }
    notes += [
        ("GB/s counts the bytes that must move: forward reads x and writes y, backward reads x and dy and writes "
         "dx (M x N each), plus weight, bias and their gradients; fwd+bwd is the sum."),
        "pct_copy: GB/s as a percentage of the copy bandwidth above (the same run, read + write counted).",
        "vs_torch, vs_compile: F.layer_norm's ms (eager, compiled) over this row's (above 1 = this row is faster).",
        ("Before timing, y (fwd) or the x/weight/bias gradients (bwd, fwd+bwd) are checked against float32 "
         "F.layer_norm: error = max |difference| / max |reference| (in the json), flagged MISMATCH above "
         f"{common.TOLERANCE[dtype]:g}."),
    ]
    draw = functools.partial(common.line_chart, rows=results, x="N", y="GB_s", series="impl", panels=("mode",),
                             title=f"layer norm, {rows} rows, {dtype}: GB/s vs N (copy: {copy_gbs:,.0f} GB/s)")
    common.report("layernorm", "LayerNorm: Triton vs F.layer_norm (eager, compiled)", results, COLUMNS, settings,
                  notes, args.out, draw)
    return common.exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
