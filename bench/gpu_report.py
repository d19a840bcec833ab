"""One command for a GPU visit: the whole test suite on CUDA and every benchmark, then one summary, in 7 minutes.

    python bench/gpu_report.py --out bench/results/h200        # 7 minutes at most on one H100/H200
    python bench/gpu_report.py --out /tmp/report --only attention tests

Runs, each as its own process group with a time limit (so a failure or a hang costs only its own part; a part
cut by its limit keeps what it wrote), quickest first: bench/layernorm.py, bench/cross_entropy.py (fused
linear cross-entropy: time and peak memory), bench/attn.py (ours against SDPA's default backend, its flash
and cuDNN backends, and compiled FlexAttention), bench/train.py (a GPT-2 training step for each
implementation), and last the whole test suite on CUDA in parallel (pytest-xdist when installed). Each
benchmark writes its .md, .json and .png into --out, every part's output goes to --out/logs/, each test's
outcome (a failure's traceback too) to --out/tests.jsonl as it finishes, and the summary is --out/summary.md
(what ran, the headline figures, the failed tests, the plots) and --out/summary.json (GPU, driver,
versions, date, command, and each part's status).

The tests need the offline copies in ../shared (tiktoken's GPT-2 files, tiny Shakespeare); a GPU machine that
receives the working tree only finds them in ./shared, an ignored folder: copy ../shared there first.

Without a GPU it says so, runs the benchmarks' CPU parts (--quick sizes: the Triton rows then read "needs a
CUDA GPU" and the cross-entropy kernel runs in Triton's interpreter) and, as the tests part, two quick test
files (the whole suite takes about 15 minutes on two cores: `python -m pytest`).
"""
import argparse
import contextlib
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import common  # noqa: E402

GPU_BUDGET_S = 420  # the parts' limits add up to this: 7 minutes
TESTS_RESULTS = "tests.jsonl"


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


def test_workers() -> int:
    """pytest-xdist workers on a GPU machine: every core but one (one GPU is shared by all of them)."""
    if importlib.util.find_spec("xdist") is None:
        return 1
    return max(1, min(15, (os.cpu_count() or 2) - 1))


def parts(gpu: bool, workers: int = 1) -> list[Part]:
    """What runs, in order: quickest first, the test suite last. On a GPU the sweeps are trimmed to fit
    GPU_BUDGET_S (attention: causal, two lengths; train: GPT-2 eager, 10 timed steps); the benchmarks run
    their full default sweeps on their own."""
    quick = [] if gpu else ["--quick"]
    # a test module whose imports fail on that machine is one error, not a run that tests nothing
    tests = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", "--continue-on-collection-errors"]
    if gpu:
        tests += ["-n", str(workers)] if workers > 1 else []
    else:
        tests += ["tests/test_layout.py", "tests/test_kernels_common.py"]
    return [
        Part("layernorm", ["bench/layernorm.py", *quick], 25, "layernorm"),
        Part("cross_entropy", ["bench/cross_entropy.py", *quick], 35, "cross_entropy"),
        Part("attention", ["bench/attn.py", *(["--causal", "yes", "--seq_len", "2048", "8192"] if gpu else quick)],
             70, "attn"),
        Part("train", ["bench/train.py", *(["--model", "gpt2", "--compile", "off", "--steps", "10"] if gpu else quick)],
             90, "train"),
        Part("tests", tests, 200),
    ]


def run_part(part: Part, out: Path, limit_s: float) -> None:
    """Run one part with its output in out/logs/NAME.log; its status says how it ended. The part runs in a
    process group of its own, all of which a limit stops (pytest-xdist's workers included)."""
    command = [sys.executable, *part.command]
    if part.benchmark:
        command += ["--out", str(out)]
        (out / f"{part.benchmark}.json").unlink(missing_ok=True)  # an earlier run's result is not this one's
    else:
        (out / TESTS_RESULTS).unlink(missing_ok=True)
        command += ["--results", str((out / TESTS_RESULTS).resolve())]
    log = out / "logs" / f"{part.name.replace(' ', '_')}.log"
    print(f"== {part.name}: {' '.join(part.command)} (limit {limit_s:.0f} s)", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        process = subprocess.Popen(command, cwd=common.REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = process.wait(timeout=limit_s)
            part.status = "ok" if rc == 0 else f"failed (exit status {rc}; see logs/{log.name})"
        except subprocess.TimeoutExpired:
            stop_group(process)
            part.status = f"stopped at its {limit_s:.0f} s limit (see logs/{log.name})"
    part.seconds = time.perf_counter() - start
    print(f"   {part.status}, {part.seconds:.0f} s", flush=True)


def stop_group(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM to the part's process group, then SIGKILL to whatever is left of it after grace_s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # the group outlives its leader while a worker lives
    process.wait()


def read_test_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tests_headline(results: list[dict]) -> str:
    """'812 passed, 3 failed, 40 skipped' from tests.jsonl (a test counts once, by its worst phase)."""
    worst = {}
    for record in results:
        rank = {"passed": 0, "skipped": 1, "failed": 2}[record["outcome"]]
        if rank >= worst.get(record["test"], (-1, ""))[0]:
            worst[record["test"]] = (rank, record["outcome"])
    counts = {}
    for _, outcome in worst.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return ", ".join(f"{counts[o]} {o}" for o in ("passed", "failed", "skipped") if o in counts) or "no test finished"


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
        lines += ["No CUDA GPU: the benchmarks ran their CPU parts at --quick sizes and the tests part two quick "
                  "files. None of these figures says how fast the kernels are on a GPU.", ""]
    table = [{"part": p.name, "status": p.status, "seconds": p.seconds, "headline": p.headline,
              "details": f"[{p.benchmark}.md]({p.benchmark}.md)" if p.benchmark and (out / f"{p.benchmark}.md").exists()
              else "-"} for p in done]
    lines.append(common.markdown_table(table, ("part", "status", "seconds", "headline", "details")))
    failed = sorted({r["test"] for r in read_test_results(out / TESTS_RESULTS) if r["outcome"] == "failed"})
    if failed:
        lines += ["", f"Failed tests (tracebacks in {TESTS_RESULTS}):", "", *(f"- `{test}`" for test in failed)]
    plots = [p.benchmark for p in done if p.benchmark and (out / f"{p.benchmark}.png").exists()]
    if plots:
        lines += ["", *(f"![{name}]({name}.png)" for name in plots)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory for the results, e.g. bench/results/h200")
    p.add_argument("--only", nargs="+", choices=[part.name for part in parts(True)], help="run only these parts")
    args = p.parse_args(argv)

    gpu = torch.cuda.is_available()
    if not gpu:
        print("no CUDA GPU: the benchmarks run their CPU parts (--quick), the tests part two quick files", flush=True)
    todo = [part for part in parts(gpu, test_workers()) if not args.only or part.name in args.only]
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    for part in todo:
        run_part(part, args.out, part.gpu_limit_s if gpu else 600)
        if part.benchmark is None:
            part.headline = tests_headline(read_test_results(args.out / TESTS_RESULTS))
        elif (args.out / f"{part.benchmark}.json").exists():
            part.headline = headline(part.benchmark, json.loads((args.out / f"{part.benchmark}.json").read_text()))

    env = {**common.environment(), "driver": driver_version() if gpu else None}
    text = summary_markdown(env, gpu, todo, args.out)
    (args.out / "summary.md").write_text(text)
    (args.out / "summary.json").write_text(json.dumps(
        {"environment": env, "gpu": gpu, "parts": [asdict(part) for part in todo]}, indent=1) + "\n")
    print(text, end="")
    print(f"wrote {args.out / 'summary.md'}, {args.out / 'summary.json'}")
    return 0 if all(part.status == "ok" for part in todo) else 1


if __name__ == "__main__":
    sys.exit(main())
