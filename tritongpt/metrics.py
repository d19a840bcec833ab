"""What a training run reports: out_dir/metrics.jsonl, the loss curve (out_dir/loss.png), step time, ETA
and model FLOPs utilization (MFU) against the GPU's peak."""
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tritongpt.fileio import atomic_open

# Dense bf16/fp16 tensor-core peaks in FLOP/s, by the name CUDA reports (first match wins, so the more
# specific names come first). A GPU missing here gets no MFU rather than a wrong one.
GPU_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("V100", 125e12),
    ("T4", 65e12),
)


def gpu_peak_flops(device: str | torch.device, dtype: str) -> float | None:
    """The tensor-core peak of one GPU like the one running this process, or None (CPU, fp32, or an
    unknown GPU)."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in ("bfloat16", "float16") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in GPU_PEAK_FLOPS:
        if key in name:
            return peak
    return None


def mfu_per_gpu(flops_per_sequence: float, sequences_per_rank: int, dt: float, peak_flops: float | None,
                model_parallel: int = 1) -> float | None:
    """MFU of one process: the sequences its data rank ran in a step (its micro-batches only, not the global
    batch), each costing flops_per_sequence (the whole model's: GPT.flops_per_token() * block_size), over
    one GPU's peak. Tensor and pipeline parallelism split each sequence's work over model_parallel GPUs.
    Every GPU does the same work, so this is the run's."""
    if peak_flops is None or dt <= 0:
        return None
    return flops_per_sequence * sequences_per_rank / model_parallel / dt / peak_flops


def synchronize(device: str | torch.device) -> None:
    device = str(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    elif device.startswith("mps"):
        torch.mps.synchronize()


def wall_ms(fn: Callable[[], object], device: str | torch.device, runs: int, warmup: int = 1,
            budget_s: float = math.inf) -> float:
    """Median wall-clock milliseconds of fn over `runs` calls after `warmup` untimed ones, waiting for the
    device around each call; fewer runs (one at least) once the timed ones have taken budget_s. For whole
    loops (a training step, a generation) whose Python overhead is part of the answer, and for every
    timing off CUDA (bench/ and `auto`'s choice share it)."""
    for _ in range(warmup):
        fn()
    times = []
    while len(times) < runs and (not times or sum(times) < budget_s):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def format_eta(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class StepTimer:
    """Smoothed step time and MFU. The first `warmup` steps of a process (compilation, allocation,
    autotuning) are left out, so the ETA comes from steps that took their usual time."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self.steps_seen = 0
        self.step_time: float | None = None
        self.mfu: float | None = None

    def update(self, dt: float, mfu: float | None) -> None:
        self.steps_seen += 1
        if self.steps_seen <= self.warmup:
            return
        self.step_time = dt if self.step_time is None else 0.9 * self.step_time + 0.1 * dt
        if mfu is not None:
            self.mfu = mfu if self.mfu is None else 0.9 * self.mfu + 0.1 * mfu

    def eta(self, steps_left: int) -> str:
        return "measuring" if self.step_time is None else format_eta(steps_left * self.step_time)


class RunLog:
    """What a run reports at its evals and log steps: the console, out_dir/metrics.jsonl, out_dir/loss.png,
    and Weights & Biases when `wandb_init` (wandb.init's arguments) is given. Only the master process
    reports (`enabled`); `mfu(dt)` is a step's MFU, or None."""

    def __init__(self, out_dir: str | Path, tokens_per_iter: int, max_iters: int, enabled: bool,
                 mfu: Callable[[float], float | None], wandb_init: dict | None = None):
        self.out_dir, self.tokens_per_iter, self.max_iters = out_dir, tokens_per_iter, max_iters
        self.enabled, self.mfu = enabled, mfu
        self.timer = StepTimer()
        self.wandb = None
        if enabled and wandb_init is not None:
            import wandb

            wandb.init(**wandb_init)
            self.wandb = wandb

    def eval(self, iter_num: int, losses: dict[str, float], lr: float, perplexity: bool = False) -> None:
        if not self.enabled:
            return
        print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if perplexity:
            print(f"val perplexity {math.exp(losses['val']):.2f}")
        log_metrics(self.out_dir, {"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"], "lr": lr})
        plot_losses(self.out_dir, self.tokens_per_iter)
        if self.wandb is not None:
            self.wandb.log({"iter": iter_num, "train/loss": losses["train"], "val/loss": losses["val"], "lr": lr})

    def step(self, iter_num: int, loss: float, lr: float, dt: float) -> None:
        """A training step of dt seconds that ended with `loss`."""
        if not self.enabled:
            return
        self.timer.update(dt, self.mfu(dt))
        tokens_per_s = self.tokens_per_iter / dt
        mfu_text = "n/a" if self.timer.mfu is None else f"{self.timer.mfu * 100:.2f}%"
        print(f"iter {iter_num}: loss {loss:.4f}, time {dt * 1000:.2f}ms, mfu {mfu_text}, "
              f"tok/s {tokens_per_s:,.0f}, eta {self.timer.eta(self.max_iters - iter_num - 1)}")
        log_metrics(self.out_dir, {"iter": iter_num, "loss": loss, "lr": lr, "ms": dt * 1000,
                                   "tokens_per_s": tokens_per_s, "mfu": self.timer.mfu})
        if self.wandb is not None:
            self.wandb.log({"iter": iter_num, "train/loss_step": loss, "tokens_per_s": tokens_per_s})


def log_metrics(out_dir: str | Path, record: dict) -> None:
    """Append one record to out_dir/metrics.jsonl. A line left torn by a killed run is ended first, so the
    record lands on a line of its own."""
    with open(Path(out_dir) / "metrics.jsonl", "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(record) + "\n").encode())


def read_metrics(out_dir: str | Path) -> list[dict]:
    """The records of out_dir/metrics.jsonl, skipping (and saying so) lines that are not whole records: a
    run killed while writing, or a full disk, leaves one torn."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records, torn = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                record = None
                torn += 1
            if isinstance(record, dict) and isinstance(record.get("iter"), int):
                records.append(record)
    if torn:
        print(f"{path}: skipped {torn} torn line(s), left by a run that was killed while writing", file=sys.stderr)
    return records


def plot_losses(out_dir: str | Path, tokens_per_iter: int) -> Path | None:
    """Draw out_dir/loss.png from metrics.jsonl: train (every logged step, and at evals) and val loss
    against iterations, with tokens on a second axis. None when matplotlib is not installed or drawing
    fails: a plot is never worth a run, or the checkpoint saved after it, so a failure is only a warning."""
    try:
        return _plot_losses(out_dir, tokens_per_iter)
    except Exception as error:  # a broken matplotlib, a full disk, odd records: all the same here
        print(f"warning: could not draw {Path(out_dir) / 'loss.png'} ({type(error).__name__}: {error}); "
              "training goes on", file=sys.stderr)
        return None


def _plot_losses(out_dir: str | Path, tokens_per_iter: int) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(out_dir)
    # a resumed or restarted run logs some iterations again: the last record of each counts
    steps = sorted({r["iter"]: r["loss"] for r in records if r.get("loss") is not None and math.isfinite(r["loss"])}.items())
    evals = sorted({r["iter"]: (r["iter"], r["train_loss"], r["val_loss"]) for r in records if "val_loss" in r}.values())
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    if steps:
        ax.plot(*zip(*steps), color="tab:blue", alpha=0.35, linewidth=0.8, label="train (step)")
    if evals:
        iters, train, val = zip(*evals)
        ax.plot(iters, train, "o-", color="tab:blue", markersize=3, label="train (eval)")
        ax.plot(iters, val, "o-", color="tab:orange", markersize=3, label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    tokens = ax.secondary_xaxis("top", functions=(lambda i: i * tokens_per_iter / 1e6,
                                                 lambda t: t * 1e6 / tokens_per_iter))
    tokens.set_xlabel("tokens (millions)")
    path = Path(out_dir) / "loss.png"
    try:
        with atomic_open(path) as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
    return path
