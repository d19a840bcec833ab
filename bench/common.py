"""What the four benches share: command-line flags, timing, failure handling, the environment, and
the table they print and write (.md, .json, .png) under --out."""
import argparse
import datetime
import gc
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tritongpt.configurator import resolve_device, resolve_dtype
from tritongpt.metrics import synchronize, wall_ms

REPO = Path(__file__).resolve().parent.parent

# A result agrees with the float32 reference when its largest error, relative to the reference's
# largest value, is within this: about a few units of the dtype's rounding after long reductions.
TOLERANCE = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every bench has; `doc` (the script's docstring) is its help."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1 (default: auto)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="auto: bfloat16 on GPUs that have it (else float16), float32 elsewhere")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of a few seconds, on CPU too")
    p.add_argument("--out", type=Path, help="also write the results as NAME.md, NAME.json and NAME.png in this directory")
    return p


# -----------------------------------------------------------------------------
# Timing


def time_ms(fn: Callable[[], object], device: str, rep_ms: float = 100.0) -> float:
    """Median milliseconds per call of a kernel-sized fn after warm-up, over about rep_ms of calls.

    CUDA: triton.testing.do_bench, which times each call with CUDA events and flushes the L2 cache
    before it, so inputs come from HBM as they would in a model. Elsewhere: wall clock, 3 calls at least.
    """
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=int(rep_ms), return_mode="median")
    estimate = wall_ms(fn, device, runs=1)
    return wall_ms(fn, device, runs=max(3, min(100, round(rep_ms / max(estimate, 1e-3)))), warmup=0)


def peak_mib(fn: Callable[[], object], device: str) -> float | None:
    """The most GPU memory allocated during one call of fn, in MiB, counting what was allocated before
    (the inputs); None off CUDA, where PyTorch does not track it."""
    if not device.startswith("cuda"):
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def attempt(fn: Callable[[], object]) -> tuple[object, str | None]:
    """(fn(), None); (None, 'OOM') if fn runs out of GPU memory; (None, 'error: ...') on any other exception,
    whose traceback goes to stderr. One failed case becomes a table entry instead of ending the run."""
    try:
        return fn(), None
    except torch.cuda.OutOfMemoryError:
        note = "OOM"
    except Exception as error:  # noqa: BLE001 -- reported in the table and in the exit status
        traceback.print_exc()
        first_line = next(iter(str(error).splitlines()), "")
        note = f"error: {type(error).__name__}: {first_line}"
    free_memory()  # here, not in the except blocks, whose tracebacks still hold the failed case's tensors
    return None, note


def exit_status(rows: Sequence[dict]) -> int:
    """1 when a case failed or disagreed with the reference (an OOM is a result, not a failure)."""
    return int(any((row.get("note") or "").startswith(("error", "MISMATCH")) for row in rows))


# -----------------------------------------------------------------------------
# Checking results


def device_and_dtype(args: argparse.Namespace) -> tuple[str, str]:
    """The --device and --dtype flags resolved as train.py resolves them ('auto': the GPU, bf16 there)."""
    device = resolve_device(args.device)
    return device, resolve_dtype(args.dtype, device)


def sweep_size(args: argparse.Namespace, device: str) -> str:
    """Which default sweep to run: 'quick' under --quick, else the full 'gpu' one or a small 'cpu' one."""
    return "quick" if args.quick else "gpu" if device.startswith("cuda") else "cpu"


def mode_call(fn, inputs: tuple, grad_out: torch.Tensor, mode: str) -> Callable[[], object]:
    """A no-argument callable running one mode: the forward (returns the output), the backward of one
    kept forward, or both (these two return the input gradients). The forward keeps what the backward
    needs, as in training."""
    if mode == "fwd":
        return lambda: fn(*inputs)
    if mode == "bwd":
        out = fn(*inputs)
        return lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(fn(*inputs), inputs, grad_out)


def run_case(fn, inputs: tuple, grad_out: torch.Tensor, mode: str, expected, device: str, rep_ms: float) -> tuple:
    """(ms, peak MiB, error against expected) of one kernel in one mode. The first call, the check, also
    warms up (Triton and torch.compile compile there)."""
    call = mode_call(fn, inputs, grad_out, mode)
    error = max_error(call(), expected)
    return time_ms(call, device, rep_ms), peak_mib(call, device), error


def max_error(actual: torch.Tensor | Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    """The largest absolute difference over the tensors, each relative to its reference's largest value."""
    actual = (actual,) if isinstance(actual, torch.Tensor) else actual
    errors = []
    for a, e in zip(actual, expected, strict=True):
        a, e = a.detach().float(), e.detach().float()
        errors.append(float((a - e).abs().max() / e.abs().max().clamp_min(1e-30)))
    return max(errors)


def mismatch_note(error: float, dtype: str) -> str | None:
    if error <= TOLERANCE[dtype]:  # NaN fails too
        return None
    return f"MISMATCH: error {error:.2g} > {TOLERANCE[dtype]:g}"


def add_ratio(rows: list[dict], name: str, column: str, baseline: str, match: Sequence[str], by: str = "impl",
              speedup: bool = True) -> None:
    """Set rows[name] to how each row's `column` compares with that of the row whose `by` is `baseline`
    and which has the same values of the `match` keys: baseline / row for a speedup (from times), else
    row / baseline (memory). None where either value is missing."""
    base = {tuple(r[k] for k in match): r[column] for r in rows if r[by] == baseline}
    for row in rows:
        b, value = base.get(tuple(row[k] for k in match)), row[column]
        row[name] = None if not b or not value else (b / value if speedup else value / b)


# -----------------------------------------------------------------------------
# The environment


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment() -> dict:
    """Where and when the numbers were measured, and how to measure them again."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        "git_commit": git_commit(),
    }


# -----------------------------------------------------------------------------
# Output: a markdown table, printed; under --out also .md, .json and .png


def format_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(format_value(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def markdown(title: str, env: dict, settings: dict, rows: Sequence[dict], columns: Sequence[str],
             notes: Sequence[str]) -> str:
    where = env["gpu"] or f"CPU: {env['cpu']} ({env['cpu_cores']} cores, {env['torch_threads']} torch threads)"
    versions = f"torch {env['torch']}, triton {env['triton'] or '-'}, CUDA {env['cuda'] or '-'}, Python {env['python']}"
    lines = [
        f"## {title}",
        "",
        f"{where}; {versions}; {env['date']}, commit {env['git_commit'] or '-'}",
        f"`{env['command']}`",
        "",
        *(f"- {key}: {format_value(value)}" for key, value in settings.items()),
        "",
        markdown_table(rows, columns),
    ]
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def save_png(path: Path, draw: Callable) -> bool:
    """draw(plt) -> figure, saved to path; a one-line note instead when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print(f"note: {path.name} not written: matplotlib is not installed (pip install matplotlib)")
        return False
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    figure = draw(plt)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return True


def report(name: str, title: str, rows: list[dict], columns: Sequence[str], settings: dict, notes: Sequence[str],
           out: Path | None, draw: Callable | None = None) -> None:
    """Print the table; with `out`, also write out/NAME.md, NAME.json (environment, settings and one entry
    per row) and NAME.png (draw(plt) -> figure)."""
    env = environment()
    text = markdown(title, env, settings, rows, columns, notes)
    print(text, end="")
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    record = {"benchmark": name, "environment": env, "settings": settings, "notes": list(notes),
              "columns": list(columns), "rows": rows}
    (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    written = [f"{name}.md", f"{name}.json"]
    if draw is not None and save_png(out / f"{name}.png", draw):
        written.append(f"{name}.png")
    print(f"wrote {', '.join(str(out / w) for w in written)}")


def panel_groups(rows: Sequence[dict], panels: Sequence[str]) -> dict[tuple, list[dict]]:
    """Rows grouped by their values of the panel keys, in order of first appearance."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in panels), []).append(row)
    return groups


def subplots(plt, count: int, title: str):
    columns = min(count, 4)
    lines = math.ceil(count / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.4 * lines), squeeze=False)
    figure.suptitle(title)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return figure, axes.flat


def panel_title(panels: Sequence[str], key: tuple) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in zip(panels, key))


def line_chart(plt, rows: Sequence[dict], x: str, y: str, series: str, panels: Sequence[str], title: str):
    """One panel per combination of the panel keys, one line per value of `series`: y against x (log2)."""
    groups = panel_groups(rows, panels)
    figure, axes = subplots(plt, len(groups), title)
    for ax, (key, group) in zip(axes, groups.items()):
        for name in dict.fromkeys(r[series] for r in group):
            points = sorted((r[x], r[y]) for r in group if r[series] == name and r[y] is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ticks = sorted({r[x] for r in group})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_title(panel_title(panels, key), fontsize=9)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def bar_chart(plt, rows: Sequence[dict], labels: Sequence[str], y: str, panels: Sequence[str], title: str):
    """One panel per combination of the panel keys, one bar per row, named by the values of its label keys
    (a flag by its key's name when true, not at all when false)."""
    groups = panel_groups(rows, panels)
    figure, axes = subplots(plt, len(groups), title)
    for ax, (key, group) in zip(axes, groups.items()):
        names = [" ".join(k if r[k] is True else format_value(r[k]) for k in labels if r[k] is not False) for r in group]
        ax.bar(names, [r[y] or 0.0 for r in group])  # a failed case shows as an empty slot
        ax.set_title(panel_title(panels, key), fontsize=9)
        ax.set_ylabel(y)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure
