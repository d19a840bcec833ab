"""A sweep's study: its search space (train.py's config keys, checked as train.py checks them), Optuna's
storage, sampler and pruner, the trials it counts and queues, and what it found (a table of the trials, their
val loss curves and the val loss against each parameter, the best trial as a train.py command).
tritongpt/sweep.py is the program that runs the trials."""
import random
import re
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy

from tritongpt.configurator import (ConfigError, UserError, allowed_types, check_values, parse_value, script_config,
                                    script_defaults, unknown_key_error)
from tritongpt.fileio import atomic_open

TRAIN_SCRIPT = Path(__file__).resolve().parent.parent / "train.py"
KINDS = ("loguniform", "uniform", "int", "logint", "choice")
SPACE_ENTRY = re.compile(r"\s*(?P<key>\w+)\s*=\s*(?P<kind>\w+)\s*\((?P<args>.*)\)\s*")
# the sweep sets these for every trial: a value given by the user would be overwritten or meaningless
SWEEP_OWNED_KEYS = ("out_dir",)
@dataclass(frozen=True)
class Param:
    """One swept config key: a range (`low`, `high`, on a log scale if `log`) or a list of `choices`."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple = ()

    @property
    def log(self) -> bool:
        return self.kind in ("loguniform", "logint")

    def suggest(self, trial: optuna.Trial) -> object:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind in ("int", "logint"):
            return trial.suggest_int(self.key, self.low, self.high, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def contains(self, value: object) -> bool:
        if self.kind == "choice":
            return value in self.choices
        return type(value) in (int, float) and self.low <= value <= self.high


def parse_param(entry: str, defaults: dict, annotations: dict) -> Param:
    """`key=kind(args)` into a Param whose values have the key's type and lie in its range, checked with the
    configurator's own rules and messages. Raises ConfigError naming the entry and the fix."""
    match = SPACE_ENTRY.fullmatch(entry)
    if match is None:
        hint = (f"; '{entry}' looks like a config file: put config files before --space"
                if entry.endswith(".py") else "")
        raise ConfigError(f"--space entry '{entry}' is not of the form key=kind(args), e.g. "
                          f"learning_rate=loguniform(1e-4,3e-3), warmup_iters=int(0,200), n_layer=choice(2,3,4){hint}")
    key, kind, args_text = match["key"], match["kind"], match["args"]
    if key not in defaults:
        raise unknown_key_error(key, defaults, f"in --space '{entry}'")
    if key in SWEEP_OWNED_KEYS:
        raise ConfigError(f"--space '{entry}': the sweep gives each trial its own {key} under --sweep_dir")
    if kind not in KINDS:
        raise ConfigError(f"--space '{entry}': unknown kind '{kind}'; the kinds are {', '.join(KINDS)}")
    allowed = allowed_types(key, defaults[key], annotations)
    texts = [text.strip() for text in args_text.split(",") if text.strip()]
    values = [parse_value(key, text, allowed) for text in texts]
    for value in values:
        check_values({key: value})
    if kind == "choice":
        if not values or len(set(map(repr, values))) != len(values):
            raise ConfigError(f"--space '{entry}': choice() needs one or more different values")
        return Param(key, kind, choices=tuple(values))
    if len(values) != 2:
        raise ConfigError(f"--space '{entry}': {kind}() takes two numbers, the lowest and the highest value")
    low, high = values
    is_int_key = int in allowed and float not in allowed
    if kind in ("int", "logint") and not is_int_key:
        raise ConfigError(f"--space '{entry}': {key} is not an integer key; use uniform() or loguniform()")
    if kind in ("uniform", "loguniform") and type(low) is not float:
        raise ConfigError(f"--space '{entry}': {key} is not a float key; use "
                          + ("int() or logint()" if is_int_key else "choice()"))
    if not low < high:
        raise ConfigError(f"--space '{entry}': the lowest value must be below the highest")
    if kind in ("loguniform", "logint") and low <= 0:
        raise ConfigError(f"--space '{entry}': a log scale needs a lowest value above 0")
    return Param(key, kind, low, high)


def parse_space(entries: list[str], train_script: Path = TRAIN_SCRIPT) -> list[Param]:
    defaults, annotations = script_defaults(train_script)
    params = [parse_param(entry, defaults, annotations) for entry in entries]
    keys = [param.key for param in params]
    for key in keys:
        if keys.count(key) > 1:
            raise ConfigError(f"--space names {key} twice: give each key once")
    return params


def check_train_args(train_args: list[str], train_script: Path = TRAIN_SCRIPT) -> dict:
    """The config every trial starts from, checked as train.py would check it (files, keys, values)."""
    for arg in train_args:
        key = arg[2:].partition("=")[0] if arg.startswith("--") else None
        if key in SWEEP_OWNED_KEYS:
            raise ConfigError(f"'{arg}': the sweep gives each trial its own {key} under --sweep_dir; drop it")
    config = script_config(train_script, train_args)
    if config.get("init_from") == "resume":
        raise ConfigError("init_from='resume': each trial starts in a new out_dir, with nothing to resume; sweep "
                          "from scratch, or finetune every trial from a model with init_from='gpt2' or a model dir")
    return config


# -----------------------------------------------------------------------------
# The study


def open_storage(url: str, heartbeat_s: int = 60) -> optuna.storages.RDBStorage:
    """Optuna's database storage. The heartbeat marks a trial whose worker died (killed, machine lost) as
    failed after 2 heartbeats of silence, and queues it to run again, once."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():  # the heartbeat has been "experimental" since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s,
                                                  grace_period=2 * heartbeat_s, heartbeat_stale_trial_callback=retry)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as error:
                # workers started together race to create the database's tables: the losers find them made
                if attempt == 4:
                    raise UserError(f"could not open the study's storage {url}: {error}") from error
                time.sleep(0.2 + random.random())
            except (ImportError, sqlalchemy.exc.ArgumentError) as error:
                raise UserError(f"--storage={url}: {error}. It takes an SQLAlchemy URL (sqlite:///path/study.db, "
                                "postgresql://user:password@host/db, mysql+pymysql://user:password@host/db) whose "
                                "database driver is installed (pip install psycopg2-binary, or pymysql)") from error


def make_sampler(name: str, params: list[Param], startup_trials: int, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "grid":
        ranges = [param for param in params if param.kind != "choice"]
        if ranges:
            raise ConfigError(f"--sampler=grid needs every parameter as choice(...); {ranges[0].key} is a range: give "
                              f"its points, e.g. {ranges[0].key}=choice(...), or use --sampler=random or tpe")
        return optuna.samplers.GridSampler({param.key: list(param.choices) for param in params}, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(n_startup_trials=startup_trials, seed=seed)


def make_pruner(name: str, startup_trials: int) -> optuna.pruners.BasePruner:
    if name == "median":  # the first eval (iter 0, before training) says nothing about a trial: never prune there
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=1)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def check_same_study(study: optuna.Study, space: list[str], train_args: list[str]) -> None:
    """A study continues only with the space and base config it was made with: trials of two different
    sweeps in one table would compare nothing."""
    made_with = {"space": space, "train_args": train_args}
    if not study.user_attrs:
        for name, value in made_with.items():
            study.set_user_attr(name, value)
        return
    for name, value in made_with.items():
        if study.user_attrs.get(name) != value:
            raise ConfigError(f"study '{study.study_name}' was made with {name} {study.user_attrs.get(name)}, not "
                              f"{value}: run the same command to continue it, or pass --study=<a new name>")


def counted(trial: optuna.trial.FrozenTrial, rerun: set[int]) -> bool:
    """Whether a trial uses up one of --trials: an interrupted or lost one is counted through its rerun."""
    if trial.state == optuna.trial.TrialState.WAITING:
        return False
    if trial.state == optuna.trial.TrialState.FAIL:
        return not trial.user_attrs.get("interrupted") and trial.number not in rerun
    return True


def reruns(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """The numbers of the trials that another trial runs again."""
    numbers = {t.user_attrs.get("rerun_of") for t in trials} | {t.system_attrs.get("failed_trial") for t in trials}
    return numbers - {None}


def queue_interrupted(study: optuna.Study) -> None:
    """Queue each interrupted trial's parameters again (once): Ctrl-C stopped them, not their results."""
    trials = study.get_trials(deepcopy=False)
    rerun = reruns(trials)
    for trial in trials:
        if trial.user_attrs.get("interrupted") and trial.number not in rerun:
            study.enqueue_trial(trial.params, user_attrs={"rerun_of": trial.number})


def queue_baseline(study: optuna.Study, params: list[Param], base: dict, sampler: str) -> None:
    """A new study's first trial runs the config as given, if it lies in the space: every other trial is then
    compared with where the user started. (A grid runs its own points only.)"""
    values = {param.key: base[param.key] for param in params}
    if sampler != "grid" and all(param.contains(values[param.key]) for param in params):
        study.enqueue_trial(values, user_attrs={"baseline": True})


def describe(values: dict) -> str:
    return ", ".join(f"{key}={format_value(value)}" for key, value in values.items())


def format_value(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# -----------------------------------------------------------------------------
# What the sweep found: a table, two plots, the best trial as a command


def state_name(trial: optuna.trial.FrozenTrial) -> str:
    """complete, pruned, failed, interrupted, running or waiting."""
    if trial.state == optuna.trial.TrialState.FAIL:
        return "interrupted" if trial.user_attrs.get("interrupted") else "failed"
    return trial.state.name.lower()


def last_val_loss(trial: optuna.trial.FrozenTrial) -> float | None:
    """The objective of a finished trial, else the last val loss it reported (a pruned trial's)."""
    if trial.value is not None:
        return trial.value
    return trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None


def note(trial: optuna.trial.FrozenTrial) -> str:
    parts = []
    if trial.user_attrs.get("baseline"):
        parts.append("the config as given")
    rerun_of = trial.user_attrs.get("rerun_of", trial.system_attrs.get("failed_trial"))
    if rerun_of is not None:
        parts.append(f"reruns trial {rerun_of}")
    if trial.user_attrs.get("error"):
        parts.append(trial.user_attrs["error"].replace("|", "\\|"))
    return "; ".join(parts)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return min(complete, key=lambda t: t.value) if complete else None


def best_command(trial: optuna.trial.FrozenTrial, train_args: list[str]) -> str:
    """The best trial as a train.py command line (floats in full, so it is the same run)."""
    overrides = [f"--{key}={value!r}" if isinstance(value, float) else f"--{key}={value}"
                 for key, value in trial.params.items()]
    return shlex.join(["python", "train.py", *train_args, *overrides])


def write_table(study: optuna.Study, params: list[Param], train_args: list[str], path: Path) -> None:
    best = best_trial(study)
    lines = [f"# Sweep '{study.study_name}'", ""]
    if best is not None:
        lines += [f"Best: trial {best.number}, val loss {best.value:.4f}:", "", f"    {best_command(best, train_args)}", ""]
    header = ["trial", "state", *(param.key for param in params), "val loss", "steps", "seconds", "note"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for trial in study.get_trials(deepcopy=False):
        loss = last_val_loss(trial)
        cells = [str(trial.number) + (" (best)" if best is not None and trial.number == best.number else ""),
                 state_name(trial), *(format_value(trial.params.get(param.key, "")) for param in params),
                 "" if loss is None else f"{loss:.4f}", str(trial.user_attrs.get("steps", "")),
                 str(trial.user_attrs.get("seconds", "")), note(trial)]
        lines.append("| " + " | ".join(cells) + " |")
    with atomic_open(path) as f:
        f.write(("\n".join(lines) + "\n").encode())


def plot_sweep(study: optuna.Study, params: list[Param], curves_path: Path, params_path: Path) -> None:
    """curves.png: each trial's val loss against iterations (the best in black, pruned ones dashed).
    params.png: the val loss against each parameter (finished trials filled, pruned ones hollow, at the
    last val loss they reached)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    trials = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    best = best_trial(study)
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for trial in trials:
        steps = sorted(trial.intermediate_values)
        is_best = best is not None and trial.number == best.number
        ax.plot(steps, [trial.intermediate_values[s] for s in steps], marker="o" if is_best else ".",
                linestyle="--" if trial.state == optuna.trial.TrialState.PRUNED else "-",
                color="black" if is_best else None, alpha=1.0 if is_best else 0.5, markersize=3,
                label=f"best: trial {trial.number}" if is_best else None, zorder=3 if is_best else 2)
    if trials:  # up to where each trial ended: the first evals (an untrained model's loss) would squeeze the rest
        top = max(last_val_loss(t) for t in trials)
        low = min(min(t.intermediate_values.values()) for t in trials)
        ax.set_ylim(low - 0.05 * (top - low + 0.1), top + 0.1 * (top - low + 0.1))
    ax.set_xlabel("iteration")
    ax.set_ylabel("val loss")
    ax.set_title(f"{len(trials)} trials (pruned: dashed)")
    ax.grid(alpha=0.3)
    if best is not None:
        ax.legend()
    save_figure(fig, curves_path, plt)

    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.5), layout="constrained", squeeze=False)
    for ax, param in zip(axes[0], params):
        for state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
            points = [(t.params[param.key], last_val_loss(t)) for t in trials if t.state == state and param.key in t.params]
            if not points:
                continue
            xs, ys = zip(*points)
            if param.kind == "choice":
                xs = [param.choices.index(x) for x in xs]
            filled = state == optuna.trial.TrialState.COMPLETE
            ax.scatter(xs, ys, facecolors="tab:blue" if filled else "none", edgecolors="tab:blue",
                       label="finished" if filled else "pruned (its last eval)")
        if param.kind == "choice":
            ax.set_xticks(range(len(param.choices)), [str(c) for c in param.choices])
        elif param.log:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))  # 0.005, 0.01, 0.02...
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(param.key)
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend()
    save_figure(fig, params_path, plt)


def save_figure(fig, path: Path, plt) -> None:
    try:
        with atomic_open(path) as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)


def write_report(study: optuna.Study, params: list[Param], train_args: list[str], sweep_dir: Path) -> None:
    write_table(study, params, train_args, sweep_dir / "trials.md")
    try:
        plot_sweep(study, params, sweep_dir / "curves.png", sweep_dir / "params.png")
    except Exception as error:  # a missing or broken matplotlib: the table has the results, the sweep goes on
        print(f"warning: could not draw the sweep's plots ({type(error).__name__}: {error})", file=sys.stderr)

