"""The lm_head's loss: our fused linear cross-entropy (kernels/cross_entropy.py) against
F.cross_entropy(x @ weight.T), eager and compiled: time and peak memory of forward + backward.

    python bench/cross_entropy.py                  # GPU: vocab 50304, widths 768-1600, 8k-64k rows, bfloat16
    python bench/cross_entropy.py --out bench/results
    python bench/cross_entropy.py --quick          # seconds, on CPU too

On a GPU, peak memory is torch.cuda's, counting the inputs. Without one, the kernel runs in Triton's
interpreter at reduced sizes (its time says nothing about a GPU's), and the peak is that of the tensors
PyTorch allocates during the call, from its profiler; then the table's last rows give, for the GPU
shapes, the exact bytes of the logits each way holds at once: all rows x vocab for F.cross_entropy
(which also keeps their log-softmax and gradient, each as large), one chunk for the fused loss.
"""
import functools
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernel runs on CPU

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench import common  # noqa: E402
from kernels.cross_entropy import chunk_rows, linear_cross_entropy  # noqa: E402

VOCAB = 50304
SHAPES = {  # (rows, width, vocab)
    "gpu": [(rows, width, VOCAB) for width in (768, 1024, 1280, 1600) for rows in (8192, 16384, 32768, 65536)],
    "cpu": [(256, 64, 1024), (512, 64, 1024)],
    "quick": [(64, 32, 512)],
}
COLUMNS = ("impl", "rows", "width", "vocab", "ms", "peak_MiB", "logits_MiB", "vs_torch", "mem_vs_torch", "note")


def torch_loss(x, weight, targets):
    return F.cross_entropy((x @ weight.T).float(), targets)


def cpu_peak_mib(fn) -> float:
    """The most bytes of tensors PyTorch held at once during fn, from its profiler's allocation events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def bench_shape(impls: dict, rows: int, width: int, vocab: int, device: str, dtype: torch.dtype) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, width, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (0.02 * torch.randn(vocab, width, device=device, dtype=dtype, generator=gen)).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), device=device, generator=gen)
    expected = None
    results = []
    for name, fn in impls.items():
        def step():
            x.grad = weight.grad = None
            loss = fn(x, weight, targets)
            loss.backward()
            return loss

        loss, note = common.attempt(step)
        row = {"impl": name, "rows": rows, "width": width, "vocab": vocab, "note": note}
        if note is None:
            expected = loss if expected is None else expected
            error = abs(loss.item() - expected.item()) / abs(expected.item())
            row["note"] = common.mismatch_note(error, str(dtype).removeprefix("torch."))
            runs = 1 if device == "cpu" and name == "triton" else None  # the interpreter is slow
            row["ms"] = common.wall_ms(step, device, runs) if runs else common.time_ms(step, device)
            row["peak_MiB"] = common.peak_mib(step, device) if device.startswith("cuda") else cpu_peak_mib(step)
        row["logits_MiB"] = (rows if name != "triton" else min(rows, chunk_rows(rows, width, vocab))) * vocab \
            * dtype.itemsize / 2**20
        results.append(row)
        common.free_memory()
    return results


def full_size_rows(dtype: torch.dtype) -> list[dict]:
    """The logits each way holds at once, at the GPU shapes: arithmetic, exact by construction."""
    rows = []
    for n_rows, width, vocab in SHAPES["gpu"]:
        for name, held in (("torch (arithmetic)", n_rows), ("triton (arithmetic)", chunk_rows(n_rows, width, vocab))):
            rows.append({"impl": name, "rows": n_rows, "width": width, "vocab": vocab,
                         "logits_MiB": min(held, n_rows) * vocab * dtype.itemsize / 2**20, "note": None})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    args = p.parse_args(argv)
    device, dtype_name = common.device_and_dtype(args)
    dtype = getattr(torch, dtype_name)
    size = common.sweep_size(args, device)
    impls = {"triton": linear_cross_entropy, "torch": torch_loss}
    if device.startswith("cuda") and not args.quick:
        impls["torch.compile"] = torch.compile(torch_loss)
    results = []
    for rows, width, vocab in SHAPES[size]:
        print(f"rows={rows} width={width} vocab={vocab}", file=sys.stderr, flush=True)
        results += bench_shape(impls, rows, width, vocab, device, dtype)
    if device.startswith("cuda"):  # the interpreter's time is no kernel's
        common.add_ratio(results, "vs_torch", "ms", "torch", ("rows", "width", "vocab"))
    common.add_ratio(results, "mem_vs_torch", "peak_MiB", "torch", ("rows", "width", "vocab"))
    if not device.startswith("cuda"):
        results += full_size_rows(torch.bfloat16)
    settings = {"device": device, "dtype": dtype_name,
                "peak memory": "torch.cuda max allocated" if device.startswith("cuda") else
                "PyTorch profiler's CPU allocations (the kernel in Triton's interpreter)"}
    notes = [
        "ms: forward + backward of the mean loss; peak_MiB: during one such call, inputs included on a GPU, "
        "only what the call allocates on CPU.",
        "logits_MiB: the logits held at once (all rows for torch; one chunk of rows for triton).",
        "vs_torch, mem_vs_torch: torch's ms or peak over this row's (above 1: this row is faster / smaller).",
        "Rows marked (arithmetic) are computed, not measured: the bytes of the logits at the GPU shapes, bf16.",
    ]
    measured = [row for row in results if row.get("peak_MiB") is not None]
    draw = functools.partial(common.bar_chart, rows=measured, labels=("impl",), y="peak_MiB",
                             panels=("rows", "width", "vocab"), title=f"peak memory of forward + backward, {dtype_name}")
    common.report("cross_entropy", "Fused linear cross-entropy vs F.cross_entropy(x @ W.T)", results, COLUMNS,
                  settings, notes, args.out, draw)
    return common.exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
