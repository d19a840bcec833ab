"""One command for a GPU's first measurement: the GPU tests and every benchmark, then one summary.

    python bench/gpu_report.py --out bench/results/h100      # about 10 minutes on one H100
    python bench/gpu_report.py --out /tmp/report --only attention train

Runs, each as its own process with a time limit (so one failure or hang costs only its own part):
`pytest -m gpu` (the tests that need CUDA), bench/attn.py, bench/layernorm.py, bench/cross_entropy.py
(fused linear cross-entropy: time and peak memory) and bench/train.py (a training step, eager and
compiled, for each implementation). Each benchmark writes its .md, .json and .png into --out, its output
goes to --out/logs/, and the summary is --out/summary.md (a table of what ran, the headline figures and
the plots) and --out/summary.json (GPU, driver, versions, date, command, and each part's status).

Without a GPU it says so, skips the GPU tests, and runs the benchmarks' CPU parts (--quick sizes): the
Triton rows then read "needs a CUDA GPU" and the cross-entropy kernel runs in Triton's interpreter.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import common  # noqa: E402


@dataclass
class Part:
    """One process of the report: its command (after the interpreter), and its time limit on a GPU."""

    name: str
    command: list[str]
    gpu_limit_s: int
    benchmark: str | None = None  # the NAME of the NAME.json it writes, if it is a benchmark
    status: str = "not run"
    seconds: float | None = None
    headline: str = ""


def parts(gpu: bool) -> list[Part]:
    """What runs, in order. The GPU limits add up to under 10 minutes: the sweeps are the benchmarks' own
    defaults, trimmed where the default would not fit (attention: three lengths; train: 10 timed steps)."""
    quick = [] if gpu else ["--quick"]
    return [
        Part("gpu tests", ["-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"], 100),
        Part("attention", ["bench/attn.py", *(["--seq_len", "1024", "4096", "16384"] if gpu else quick)], 150,
             "attn"),
        Part("layernorm", ["bench/layernorm.py", *quick], 60, "layernorm"),
        Part("cross_entropy", ["bench/cross_entropy.py", *quick], 90, "cross_entropy"),
        Part("train", ["bench/train.py", *(["--steps", "10"] if gpu else quick)], 170, "train"),
    ]


def run_part(part: Part, out: Path, limit_s: float) -> None:
    """Run one part with its output in out/logs/NAME.log; its status says how it ended."""
    command = [sys.executable, *part.command]
    if part.benchmark:
        command += ["--out", str(out)]
        (out / f"{part.benchmark}.json").unlink(missing_ok=True)  # an earlier run's result is not this one's
    log = out / "logs" / f"{part.name.replace(' ', '_')}.log"
    print(f"== {part.name}: {' '.join(part.command)} (limit {limit_s:.0f} s)", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(command, cwd=common.REPO, stdout=f, stderr=subprocess.STDOUT,
                                timeout=limit_s).returncode
            part.status = "ok" if rc == 0 else f"failed (exit status {rc}; see logs/{log.name})"
        except subprocess.TimeoutExpired:
            part.status = f"stopped at its {limit_s:.0f} s limit (see logs/{log.name})"
    part.seconds = time.perf_counter() - start
    print(f"   {part.status}, {part.seconds:.0f} s", flush=True)


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value: float | None, suffix: str = "x") -> str:
    return "-" if value is None else f"{value:.3g}{suffix}"


def headline(benchmark: str, record: dict) -> str:
    """The figures a reader looks for first, from a benchmark's .json: how our kernels compare."""
    rows = record["rows"]
    triton = [r for r in rows if str(r.get("impl", "")).startswith("triton")]
    if benchmark in ("attn", "layernorm", "cross_entropy") and not triton:
        return "Triton rows not run: they need a CUDA GPU"
    if benchmark == "attn":
        both = [r for r in triton if r["mode"] == "fwd+bwd"]
        return (f"triton fwd+bwd vs sdpa: median {_fmt(_median(r['vs_sdpa'] for r in both))}, "
                f"best {_fmt(max((r['TFLOPS'] or 0 for r in both), default=None), ' TFLOPS')}")
    if benchmark == "layernorm":
        both = [r for r in triton if r["mode"] == "fwd+bwd"]
        return (f"triton fwd+bwd vs torch: median {_fmt(_median(r['vs_torch'] for r in both))}, "
                f"vs torch.compile {_fmt(_median(r['vs_compile'] for r in both))}")
    if benchmark == "cross_entropy":  # on CPU the kernel runs interpreted: its memory counts, its time does not
        timed = _median(r.get("vs_torch") for r in triton)
        memory = _median(r.get("mem_vs_torch") for r in triton)
        return (f"fused vs F.cross_entropy(x @ W.T): speedup median {_fmt(timed)}, "
                f"peak memory F.cross_entropy / fused median {_fmt(memory)}")
    if benchmark == "train":
        best = {}
        for r in rows:
            if r["tok_s"] and r["tok_s"] > best.get(r["model"], {}).get("tok_s", 0):
                best[r["model"]] = r
        return "; ".join(f"{model}: fastest {r['impl']}{' compiled' if r['compile'] else ''} "
                         f"{r['tok_s']:,.0f} tok/s" for model, r in best.items()) or "no step ran"
    return ""


def gpu_tests_headline(log: Path) -> str:
    """pytest's last line ('3 passed, 1 skipped in 12.3s')."""
    lines = [line for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    return lines[-1].strip("= ") if lines else ""


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def summary_markdown(env: dict, gpu: bool, done: list[Part], out: Path) -> str:
    where = f"{env['gpu']} (driver {env['driver'] or '-'})" if gpu else f"no GPU: CPU {env['cpu']}"
    lines = [
        "## GPU report" if gpu else "## GPU report: no GPU, CPU parts only",
        "",
        f"{where}; torch {env['torch']}, triton {env['triton'] or '-'}, CUDA {env['cuda'] or '-'}, "
        f"Python {env['python']}; {env['date']}, commit {env['git_commit'] or '-'}",
        f"`{env['command']}`",
        "",
    ]
    if not gpu:
        lines += ["No CUDA GPU: the GPU tests were not run and the benchmarks ran their CPU parts at --quick sizes. "
                  "None of these figures says how fast the kernels are on a GPU.", ""]
    table = [{"part": p.name, "status": p.status, "seconds": p.seconds, "headline": p.headline,
              "details": f"[{p.benchmark}.md]({p.benchmark}.md)" if p.benchmark and (out / f"{p.benchmark}.md").exists()
              else "-"} for p in done]
    lines.append(common.markdown_table(table, ("part", "status", "seconds", "headline", "details")))
    plots = [p.benchmark for p in done if p.benchmark and (out / f"{p.benchmark}.png").exists()]
    if plots:
        lines += ["", *(f"![{name}]({name}.png)" for name in plots)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory for the results, e.g. bench/results/h100")
    p.add_argument("--only", nargs="+", choices=[part.name.replace(" ", "_") for part in parts(True)],
                   help="run only these parts")
    args = p.parse_args(argv)

    gpu = torch.cuda.is_available()
    if not gpu:
        print("no CUDA GPU: skipping the GPU tests; the benchmarks run their CPU parts (--quick)", flush=True)
    todo = [part for part in parts(gpu) if not args.only or part.name.replace(" ", "_") in args.only]
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    for part in todo:
        if part.name == "gpu tests" and not gpu:
            part.status = "skipped: no CUDA GPU"
            continue
        run_part(part, args.out, part.gpu_limit_s if gpu else 600)
        if part.benchmark is None:
            part.headline = gpu_tests_headline(args.out / "logs" / "gpu_tests.log")
        elif (args.out / f"{part.benchmark}.json").exists():
            part.headline = headline(part.benchmark, json.loads((args.out / f"{part.benchmark}.json").read_text()))

    env = {**common.environment(), "driver": driver_version() if gpu else None}
    text = summary_markdown(env, gpu, todo, args.out)
    (args.out / "summary.md").write_text(text)
    (args.out / "summary.json").write_text(json.dumps(
        {"environment": env, "gpu": gpu, "parts": [asdict(part) for part in todo]}, indent=1) + "\n")
    print(text, end="")
    print(f"wrote {args.out / 'summary.md'}, {args.out / 'summary.json'}")
    return 0 if all(part.status == "ok" or part.status.startswith("skipped") for part in todo) else 1


if __name__ == "__main__":
    sys.exit(main())
