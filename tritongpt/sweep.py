"""Hyperparameter sweeps over any of train.py's config keys, with Optuna doing the searching and the storing.

$ python -m tritongpt.sweep config/shakespeare_cpu.py --eval_interval=60 --trials=16 \\
      --space "muon_lr=loguniform(0.005,0.08)" "warmup_iters=int(0,100)" "n_layer=choice(2,3)" --sampler=tpe

Each trial is one `python train.py <config files and --key=value given here> --<key>=<sampled value> ...`
run in its own out_dir (<sweep_dir>/trial_<n>: checkpoint, metrics.jsonl, loss.png, train.log). The sweep
reads the val loss from metrics.jsonl at every eval and reports it to Optuna, whose pruner (median, or
successive halving) stops a trial that is going nowhere with SIGTERM, the signal train.py stops cleanly on.
The objective is the trial's best (or final) val loss. A trial that crashes or diverges is recorded as
failed with train.py's error line, and the sweep goes on. Ctrl-C stops the running trial the same way;
running the same command again continues the study from its storage and reruns the interrupted trial.

The study lives in `--storage` (default: SQLite in <sweep_dir>/study.db). Several workers share one study by
running the same command with the same storage: several processes of one machine (one per GPU, each with its
own --device=cuda:N) on the SQLite file, or several machines on a PostgreSQL/MySQL URL. After each trial the
sweep rewrites <sweep_dir>/trials.md (a table of every trial), curves.png (their val loss curves) and
params.png (val loss against each parameter), and at the end prints the best trial as a train.py command.
"""
import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna

from tritongpt.configurator import ConfigError, UserError, error_boundary
from tritongpt.fileio import writable_directory
from tritongpt.study import (TRAIN_SCRIPT, Param, best_command, best_trial, check_same_study, check_train_args,
                             counted, describe, make_pruner, make_sampler, open_storage, parse_space,
                             queue_baseline, queue_interrupted, reruns, write_report)


class TrialFailed(Exception):
    """A trial's training ended without a result (a crash, divergence, or no eval): recorded, and the sweep
    goes on."""


# -----------------------------------------------------------------------------
# One trial: a train.py process, watched through its metrics.jsonl


class MetricsTail:
    """The records appended to a metrics.jsonl since the last read (whole lines only: train.py may be
    writing the next one)."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def new_records(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        whole = data[: data.rfind(b"\n") + 1]
        self.offset += len(whole)
        records = []
        for line in whole.decode("utf-8", errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a killed run
        return [r for r in records if isinstance(r, dict) and isinstance(r.get("iter"), int)]


def stop_child(child: subprocess.Popen, grace_s: float = 120.0) -> None:
    """SIGTERM, on which train.py saves a checkpoint after its current step and exits; SIGKILL if it takes
    longer than grace_s (or on a second Ctrl-C while waiting)."""
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout=grace_s)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        child.kill()
        child.wait()
        raise


def failure_reason(log_path: Path, returncode: int) -> str:
    """train.py's own `error: ...` line, else the log's last line, with the exit status."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    reason = errors[-1][len("error:"):].strip() if errors else (lines[-1] if lines else "no output")
    return f"{reason} (exit status {returncode}; the whole log is {log_path})"


def run_trial(trial: optuna.Trial, command: list[str], trial_dir: Path, objective: str, poll_s: float) -> float:
    """Run one training, reporting each eval's val loss to the pruner; the trial's objective value."""
    trial_dir.mkdir(parents=True)
    log_path, tail = trial_dir / "train.log", MetricsTail(trial_dir / "metrics.jsonl")
    evals: dict[int, float] = {}
    steps = 0
    started = time.time()
    try:
        with open(log_path, "wb") as log:
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            try:
                while True:
                    finished = child.poll() is not None  # before reading: every record it wrote is then seen
                    for record in tail.new_records():
                        steps = max(steps, record["iter"])
                        value = record.get("val_loss")
                        if value is None or record["iter"] in evals or not math.isfinite(value):
                            continue
                        evals[record["iter"]] = value
                        trial.report(value, record["iter"])
                        if trial.should_prune():
                            stop_child(child)
                            raise optuna.TrialPruned(f"val loss {value:.4f} at iter {record['iter']}")
                    if finished:
                        break
                    time.sleep(poll_s)
            except BaseException:
                stop_child(child)
                raise
    finally:
        trial.set_user_attr("steps", steps)
        trial.set_user_attr("seconds", round(time.time() - started, 1))
    if child.returncode != 0:
        raise TrialFailed(failure_reason(log_path, child.returncode))
    if not evals:
        raise TrialFailed(f"no eval ran (max_iters and eval_interval leave none?); the log is {log_path}")
    return min(evals.values()) if objective == "best" else evals[max(evals)]


@dataclass
class Sweep:
    """What every trial of one sweep shares."""

    params: list[Param]
    train_args: list[str]
    sweep_dir: Path
    objective: str = "best"
    train_command: tuple[str, ...] = (sys.executable, str(TRAIN_SCRIPT))
    poll_s: float = 0.5

    def command(self, values: dict, trial_dir: Path) -> list[str]:
        overrides = [f"--{key}={value}" for key, value in values.items()]
        return [*self.train_command, *self.train_args, *overrides, f"--out_dir={trial_dir}"]

    def __call__(self, trial: optuna.Trial) -> float:
        values = {param.key: param.suggest(trial) for param in self.params}
        trial_dir = self.sweep_dir / f"trial_{trial.number}"
        trial.set_user_attr("out_dir", str(trial_dir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        print(f"trial {trial.number}: {describe(values)}", flush=True)
        try:
            value = run_trial(trial, self.command(values, trial_dir), trial_dir, self.objective, self.poll_s)
        except TrialFailed as error:
            trial.set_user_attr("error", str(error))
            print(f"trial {trial.number} failed: {error}", flush=True)
            raise
        except optuna.TrialPruned as pruned:
            print(f"trial {trial.number} pruned: {pruned}", flush=True)
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        print(f"trial {trial.number}: val loss {value:.4f}", flush=True)
        return value


def run_sweep(study: optuna.Study, sweep: Sweep, trials: int, after_trial=None) -> None:
    """Run trials until the study holds `trials` of them (counting other workers'), or a grid is covered."""
    queue_interrupted(study)
    while True:
        all_trials = study.get_trials(deepcopy=False)
        rerun = reruns(all_trials)
        if sum(counted(t, rerun) for t in all_trials) >= trials:
            return
        sampler = study.sampler
        waiting = any(t.state == optuna.trial.TrialState.WAITING for t in all_trials)
        if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study) and not waiting:
            return
        study.optimize(sweep, n_trials=1, catch=(TrialFailed,))
        if after_trial is not None:
            after_trial(study)


# -----------------------------------------------------------------------------
# The program


def parse_command_line(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The sweep's own flags, and the rest: config files and --key=value pairs for every trial's train.py."""
    parser = argparse.ArgumentParser(
        prog="python -m tritongpt.sweep", allow_abbrev=False,  # no prefix matching: --s must not become --study
        usage="python -m tritongpt.sweep [config/file.py ...] [--key=value ...] --space KEY=KIND(ARGS) ... [options]",
        description="Search train.py's config keys with Optuna. Config files and --key=value pairs other than "
                    "the options below go to every trial's train.py.")
    parser.add_argument("--space", nargs="+", required=True, metavar="KEY=KIND(ARGS)",
                        help="the keys to search: loguniform(lo,hi), uniform(lo,hi), int(lo,hi), logint(lo,hi) or "
                             "choice(a,b,...), e.g. learning_rate=loguniform(1e-4,3e-3) n_layer=choice(2,3,4)")
    parser.add_argument("--trials", type=int, help="trials in the study, all workers together (default: 20, or "
                                                   "the number of points of a grid)")
    parser.add_argument("--sampler", choices=("tpe", "random", "grid"), default="tpe")
    parser.add_argument("--pruner", choices=("median", "halving", "none"), default="median")
    parser.add_argument("--startup_trials", type=int, default=5,
                        help="trials that run to the end before the pruner stops any (and TPE's random start)")
    parser.add_argument("--objective", choices=("best", "final"), default="best",
                        help="a trial's best val loss over its evals, or its final one")
    parser.add_argument("--sweep_dir", default="out-sweep", help="trials' out_dirs, the table and plots")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite:///<sweep_dir>/study.db); "
                                          "workers on several machines share a PostgreSQL or MySQL one")
    parser.add_argument("--study", default="sweep", help="the study's name in the storage")
    parser.add_argument("--sampler_seed", type=int, help="seed the sampler (trials keep train.py's seed)")
    args, train_args = parser.parse_known_args(argv)
    if args.trials is not None and args.trials < 1:
        parser.error(f"--trials must be at least 1, got {args.trials}")
    if args.startup_trials < 0:
        parser.error(f"--startup_trials must be at least 0, got {args.startup_trials}")
    return args, train_args


def main(argv: list[str] | None = None, train_command: tuple[str, ...] | None = None) -> None:
    error_boundary()
    args, train_args = parse_command_line(sys.argv[1:] if argv is None else argv)
    params = parse_space(args.space)
    base = check_train_args(train_args)
    sampler = make_sampler(args.sampler, params, args.startup_trials, args.sampler_seed)
    trials = args.trials or 20
    if args.sampler == "grid":
        points = math.prod(len(param.choices) for param in params)
        if args.trials is not None and args.trials > points:
            raise ConfigError(f"--trials={args.trials}, but the grid has {points} points; each runs once")
        trials = args.trials or points
    sweep_dir = writable_directory(args.sweep_dir, "--sweep_dir")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the sweep prints its own line per trial, errors included
    storage = open_storage(args.storage or f"sqlite:///{(sweep_dir / 'study.db').resolve()}")
    study = optuna.create_study(study_name=args.study, storage=storage, direction="minimize", load_if_exists=True,
                                sampler=sampler, pruner=make_pruner(args.pruner, args.startup_trials))
    check_same_study(study, args.space, train_args)
    if not study.trials:
        leftovers = sorted(sweep_dir.glob("trial_*"))
        if leftovers:
            raise ConfigError(f"{sweep_dir} holds {leftovers[0].name} of an earlier sweep, and this study is new: "
                              "pass another --sweep_dir, or remove the old trials")
        queue_baseline(study, params, base, args.sampler)
    sweep = Sweep(params, train_args, sweep_dir, args.objective, train_command or Sweep.train_command)

    def report(study: optuna.Study) -> None:
        write_report(study, params, train_args, sweep_dir)

    try:
        run_sweep(study, sweep, trials, after_trial=report)
    except KeyboardInterrupt:
        report(study)
        print(f"\ninterrupted: the running trial was stopped, the finished ones are kept in {storage.url}; run the "
              "same command again to go on", file=sys.stderr)
        sys.exit(130)
    report(study)
    best = best_trial(study)
    print(f"{len(study.trials)} trials; the table is {sweep_dir / 'trials.md'}, the plots curves.png and params.png")
    if best is None:
        raise UserError(f"no trial finished: see the errors in {sweep_dir / 'trials.md'}")
    print(f"best: trial {best.number}, val loss {best.value:.4f} ({describe(best.params)}), in {best.user_attrs['out_dir']}")
    print(best_command(best, train_args))


if __name__ == "__main__":
    main()
