"""Hyperparameter sweeps (tritongpt/sweep.py, tritongpt/study.py): the space, the study's bookkeeping, and
whole sweeps, most over a stand-in trainer (a few lines that write metrics.jsonl as train.py does) so that
pruning, failures and interrupts are fast and exact, and one over real tiny trainings with two workers."""
import importlib.util
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest

# requirements.txt has it; a machine that lacks it (the borrowed GPU machine installs nothing) skips these
optuna = pytest.importorskip("optuna")

from conftest import REPO  # noqa: E402
from test_train import TINY  # noqa: E402
from tritongpt import study as study_module  # noqa: E402
from tritongpt import sweep  # noqa: E402
from tritongpt.configurator import ConfigError, UserError, script_defaults  # noqa: E402
from tritongpt.study import Param, check_train_args, counted, parse_space, reruns  # noqa: E402

# Writes metrics.jsonl like train.py: an eval every eval_interval iterations whose val loss falls with the
# iterations and is lowest at learning_rate=1e-3; dropout > 0.4 crashes with train.py's kind of error line.
FAKE_TRAINER = """
import json, math, os, sys, time
args = dict(arg[2:].split("=", 1) for arg in sys.argv[1:] if arg.startswith("--"))
if float(args.get("dropout", 0)) > 0.4:
    sys.exit("error: dropout too high for this test")
lr = float(args.get("learning_rate", 1e-3))
os.makedirs(args["out_dir"], exist_ok=True)
for it in range(0, int(args.get("max_iters", 50)) + 1, int(args.get("eval_interval", 10))):
    val = 2 + (math.log10(lr) + 3) ** 2 + 1 / (1 + it / 10)
    with open(os.path.join(args["out_dir"], "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"iter": it, "train_loss": val, "val_loss": val}) + "\\n")
    time.sleep(float(os.environ.get("FAKE_SECONDS_PER_EVAL", "0.02")))
"""


@pytest.fixture
def fake_trainer(tmp_path):
    path = tmp_path / "fake_train.py"
    path.write_text(FAKE_TRAINER)
    return (sys.executable, str(path))


def load_study(sweep_dir, name="sweep"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'study.db'}")


def finished(study, state=optuna.trial.TrialState.COMPLETE):
    return [t for t in study.get_trials() if t.state == state]


# -----------------------------------------------------------------------------
# The space and the base config


def test_each_kind_of_space_entry_parses_with_the_keys_types():
    params = parse_space(["learning_rate=loguniform(1e-4, 3e-3)", "warmup_iters=int(0,200)", "n_layer=logint(1,8)",
                          "dropout=uniform(0,0.2)", "optimizer=choice(adamw,muon)", "n_head=choice(2,4)",
                          "bias=choice(True,False)", "device=choice(cpu,'cuda:1')"])
    assert params == [
        Param("learning_rate", "loguniform", 1e-4, 3e-3), Param("warmup_iters", "int", 0, 200),
        Param("n_layer", "logint", 1, 8), Param("dropout", "uniform", 0.0, 0.2),
        Param("optimizer", "choice", choices=("adamw", "muon")), Param("n_head", "choice", choices=(2, 4)),
        Param("bias", "choice", choices=(True, False)), Param("device", "choice", choices=("cpu", "cuda:1")),
    ]
    assert type(params[3].low) is float and type(params[5].choices[0]) is int
    assert params[0].log and params[2].log and not params[1].log


@pytest.mark.parametrize("entry, message", [
    ("learning_rate", "is not of the form key=kind(args)"),
    ("config/shakespeare_cpu.py", "put config files before --space"),
    ("learning_rat=loguniform(1e-4,1e-3)", "unknown config key 'learning_rat' in --space 'learning_rat=loguniform(1e-4,1e-3)'; did you mean 'learning_rate'?"),
    ("learning_rate=lognormal(1e-4,1e-3)", "unknown kind 'lognormal'"),
    ("learning_rate=loguniform(1e-4)", "takes two numbers"),
    ("learning_rate=loguniform(0,1e-3)", "a log scale needs a lowest value above 0"),
    ("learning_rate=uniform(1e-3,1e-4)", "the lowest value must be below the highest"),
    ("learning_rate=int(1,3)", "learning_rate is not an integer key; use uniform() or loguniform()"),
    ("n_layer=uniform(2,4)", "n_layer is not a float key; use int() or logint()"),
    ("dataset=uniform(1,2)", "dataset is not a float key; use choice()"),
    ("n_layer=choice(2,three)", "n_layer expects int"),
    ("dropout=uniform(0,1.5)", "dropout must be >= 0 and < 1"),
    ("optimizer=choice(adamw,sgd)", "optimizer must be one of 'adamw', 'muon'"),
    ("n_layer=choice(2,2)", "choice() needs one or more different values"),
    ("out_dir=choice(a,b)", "the sweep gives each trial its own out_dir"),
])
def test_a_bad_space_entry_is_a_clear_error(entry, message):
    with pytest.raises(ConfigError) as error:
        parse_space([entry])
    assert message in str(error.value)


def test_a_key_named_twice_is_refused():
    with pytest.raises(ConfigError, match="names learning_rate twice"):
        parse_space(["learning_rate=loguniform(1e-4,1e-3)", "learning_rate=choice(1e-3)"])


@pytest.mark.parametrize("args, message", [
    (["--learning_rat=1e-3"], "did you mean 'learning_rate'"),
    (["--batch_size=0"], "batch_size must be >= 1"),
    (["config/nope.py"], "config file config/nope.py not found"),
    (["--out_dir=mine"], "the sweep gives each trial its own out_dir"),
    (["--init_from=resume"], "nothing to resume"),
])
def test_the_base_config_is_checked_as_train_py_checks_it(args, message):
    with pytest.raises(ConfigError, match=message):
        check_train_args(args)


def test_every_train_py_key_goes_to_the_trials_not_to_the_sweep():
    """The sweep's own flags may not shadow (or, by prefix, swallow) any of train.py's keys."""
    defaults, _ = script_defaults(REPO / "train.py")
    for key in defaults:
        args, train_args = sweep.parse_command_line(["--space", "n_layer=choice(2)", f"--{key}=1"])
        assert train_args == [f"--{key}=1"], key


def test_a_grid_needs_points_and_runs_each_once():
    with pytest.raises(ConfigError, match="grid needs every parameter as choice"):
        study_module.make_sampler("grid", parse_space(["learning_rate=loguniform(1e-4,1e-3)"]), 5, None)


def test_a_bad_space_on_the_command_line_ends_with_one_line(tmp_path):
    command = [sys.executable, "-m", "tritongpt.sweep", "--space", "learning_rat=loguniform(1e-4,1e-3)",
               f"--sweep_dir={tmp_path}"]
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "error: unknown config key 'learning_rat' in --space 'learning_rat=loguniform(1e-4,1e-3)'; "
        "did you mean 'learning_rate'?"]


@pytest.mark.parametrize("url, message", [("not a url", "It takes an SQLAlchemy URL"),
                                          ("postgresql://user@localhost/db", "database driver is installed")])
def test_a_storage_that_cannot_be_opened_is_a_clear_error(url, message):
    if url.startswith("postgresql") and importlib.util.find_spec("psycopg2") is not None:
        pytest.skip("psycopg2 is installed here: the driver is not missing")
    with pytest.raises(UserError, match=message):
        study_module.open_storage(url)


def test_what_counts_towards_the_trials_budget():
    """Finished, pruned, failed and running trials count; an interrupted one, or one whose worker died, counts
    through its rerun instead; a queued one counts once it runs."""
    study = optuna.create_study()
    distribution = {"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2)}
    states = optuna.trial.TrialState

    def add(state, user_attrs=None, system_attrs=None):
        study.add_trial(optuna.create_trial(state=state, params={"learning_rate": 1e-3}, distributions=distribution,
                                            value=1.0 if state == states.COMPLETE else None,
                                            user_attrs=user_attrs or {}, system_attrs=system_attrs or {}))

    add(states.COMPLETE)
    add(states.PRUNED)
    add(states.FAIL, {"error": "diverged"})
    add(states.FAIL, {"interrupted": True})  # trial 3, rerun below
    add(states.FAIL)  # trial 4, lost with its worker, retried below
    add(states.COMPLETE, {"rerun_of": 3})
    add(states.WAITING, system_attrs={"failed_trial": 4})
    add(states.FAIL, {"interrupted": True})  # not rerun yet
    trials = study.get_trials()
    assert reruns(trials) == {3, 4}
    assert [counted(t, reruns(trials)) for t in trials] == [True, True, True, False, False, True, False, False]


# -----------------------------------------------------------------------------
# Whole sweeps over the stand-in trainer


def test_a_grid_covers_exactly_its_points(tmp_path, fake_trainer):
    sweep.main(["--max_iters=20", "--space", "learning_rate=choice(1e-4,1e-3,1e-2)", "n_layer=choice(2,3)",
                "--sampler=grid", "--pruner=none", f"--sweep_dir={tmp_path / 'sweep'}"], train_command=fake_trainer)
    study = load_study(tmp_path / "sweep")
    points = [(t.params["learning_rate"], t.params["n_layer"]) for t in study.get_trials()]
    assert sorted(points) == sorted(itertools.product((1e-4, 1e-3, 1e-2), (2, 3)))
    assert len(finished(study)) == 6
    best = min(finished(study), key=lambda t: t.value)
    assert best.params["learning_rate"] == 1e-3 and best.value == pytest.approx(2 + 1 / 3)  # the last eval, iter 20
    table = (tmp_path / "sweep" / "trials.md").read_text()
    assert f"| {best.number} (best) | complete |" in table and table.count("| complete |") == 6
    assert (tmp_path / "sweep" / "curves.png").stat().st_size > 0 and (tmp_path / "sweep" / "params.png").exists()


def test_the_median_pruner_stops_a_trial_worse_than_the_median(tmp_path, fake_trainer, monkeypatch):
    monkeypatch.setenv("FAKE_SECONDS_PER_EVAL", "0.3")
    sweep_dir = tmp_path / "sweep"
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", pruner=study_module.make_pruner("median", 2))
    for lr in (1e-3, 1.5e-3, 3e-2, 1.2e-3):  # the third is far worse at every eval; the fourth better than the median
        study.enqueue_trial({"learning_rate": lr})
    runner = sweep.Sweep(parse_space(["learning_rate=loguniform(1e-4,1e-1)"]), ["--max_iters=100"], sweep_dir,
                         train_command=fake_trainer, poll_s=0.05)
    sweep.run_sweep(study, runner, trials=4)
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]
    pruned = study.trials[2]
    # stopped at its first eval after iter 0 (the median pruner never judges the untrained model), well before
    # the end: the trainer was really stopped
    assert max(pruned.intermediate_values) == 10
    records = [json.loads(line) for line in (sweep_dir / "trial_2" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["iter"] for r in records) < 100 and pruned.user_attrs["steps"] < 100


def test_a_failed_trial_is_recorded_with_its_reason_and_the_sweep_goes_on(tmp_path, fake_trainer, capsys):
    sweep.main(["--max_iters=20", "--space", "dropout=choice(0.5,0.0,0.1)", "--sampler=grid",
                f"--sweep_dir={tmp_path / 'sweep'}"], train_command=fake_trainer)
    study = load_study(tmp_path / "sweep")
    failed = finished(study, optuna.trial.TrialState.FAIL)
    assert [t.params["dropout"] for t in failed] == [0.5]
    assert failed[0].user_attrs["error"].startswith("dropout too high for this test (exit status 1;")
    assert len(finished(study)) == 2
    assert "dropout too high for this test" in (tmp_path / "sweep" / "trials.md").read_text()
    assert "python train.py --max_iters=20 --dropout=" in capsys.readouterr().out


def test_a_sweep_whose_trials_all_fail_says_so(tmp_path, fake_trainer):
    with pytest.raises(UserError, match="no trial finished"):
        sweep.main(["--space", "dropout=choice(0.5,0.6)", "--sampler=grid", f"--sweep_dir={tmp_path / 's'}"],
                   train_command=fake_trainer)


def sweep_process(args, fake_trainer, **kwargs):
    code = f"from tritongpt.sweep import main; main({args!r}, train_command={fake_trainer!r})"
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def test_ctrl_c_stops_cleanly_and_a_rerun_resumes_without_repeating_finished_trials(tmp_path, fake_trainer, monkeypatch):
    monkeypatch.setenv("FAKE_SECONDS_PER_EVAL", "0.2")
    sweep_dir = tmp_path / "sweep"
    args = ["--max_iters=40", "--space", "learning_rate=choice(1e-4,1e-3,1e-2)", "--sampler=grid", "--pruner=none",
            f"--sweep_dir={sweep_dir}"]
    first = sweep_process(args, fake_trainer)
    deadline = time.time() + 120
    while not (sweep_dir / "trial_1" / "metrics.jsonl").exists():  # trial 0 is done, trial 1 running
        assert time.time() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 130, out + err
    assert "run the same command again" in err
    study = load_study(sweep_dir)
    assert [(t.state.name, t.user_attrs.get("interrupted")) for t in study.get_trials()] == [
        ("COMPLETE", None), ("FAIL", True)]
    interrupted = study.trials[1]
    assert "interrupted" in (sweep_dir / "trials.md").read_text()
    trial_0_metrics = (sweep_dir / "trial_0" / "metrics.jsonl").read_text()

    sweep.main(args, train_command=fake_trainer)
    study = load_study(sweep_dir)
    complete = finished(study)
    assert sorted(t.params["learning_rate"] for t in complete) == [1e-4, 1e-3, 1e-2]  # each point once
    assert [t.number for t in complete][0] == 0 and len(study.trials) == 4
    rerun = next(t for t in study.trials if t.user_attrs.get("rerun_of") == 1)
    assert rerun.params == interrupted.params and rerun.state.name == "COMPLETE"
    assert (sweep_dir / "trial_0" / "metrics.jsonl").read_text() == trial_0_metrics  # trial 0 did not run again


def test_a_trial_whose_worker_died_runs_again(tmp_path, fake_trainer, monkeypatch):
    monkeypatch.setenv("FAKE_SECONDS_PER_EVAL", "0.2")
    sweep_dir = tmp_path / "sweep"
    args = ["--max_iters=40", "--space", "learning_rate=choice(1e-4,1e-3)", "--sampler=grid", "--pruner=none",
            f"--sweep_dir={sweep_dir}"]
    worker = sweep_process(args, fake_trainer, start_new_session=True)
    deadline = time.time() + 120
    while not (sweep_dir / "trial_0" / "metrics.jsonl").exists():
        assert time.time() < deadline and worker.poll() is None, worker.communicate()
        time.sleep(0.05)
    os.killpg(worker.pid, signal.SIGKILL)  # the worker and its trainer, without a chance to record anything
    worker.communicate()
    storage = study_module.open_storage(f"sqlite:///{sweep_dir / 'study.db'}", heartbeat_s=1)
    study = optuna.load_study(study_name="sweep", storage=storage, sampler=optuna.samplers.GridSampler(
        {"learning_rate": [1e-4, 1e-3]}))
    assert study.trials[0].state.name == "RUNNING"
    time.sleep(3.5)  # two heartbeats of silence (the database clock counts whole seconds)
    runner = sweep.Sweep(parse_space(["learning_rate=choice(1e-4,1e-3)"]), ["--max_iters=40"], sweep_dir,
                         train_command=fake_trainer, poll_s=0.05)
    sweep.run_sweep(study, runner, trials=2)
    states = [(t.state.name, t.system_attrs.get("failed_trial")) for t in study.get_trials()]
    assert states[0] == ("FAIL", None) and ("COMPLETE", 0) in states
    assert sorted(t.params["learning_rate"] for t in finished(study)) == [1e-4, 1e-3]


def test_a_study_continues_only_with_the_space_it_was_made_with(tmp_path, fake_trainer):
    args = ["--max_iters=10", "--trials=1", f"--sweep_dir={tmp_path / 's'}"]
    sweep.main([*args, "--space", "learning_rate=loguniform(1e-4,1e-2)"], train_command=fake_trainer)
    with pytest.raises(ConfigError, match="was made with space"):
        sweep.main([*args, "--space", "learning_rate=loguniform(1e-4,1e-1)"], train_command=fake_trainer)
    with pytest.raises(ConfigError, match="holds trial_0 of an earlier sweep"):
        sweep.main([*args, "--study=other", "--space", "learning_rate=loguniform(1e-4,1e-2)"],
                   train_command=fake_trainer)


def test_the_first_trial_runs_the_config_as_given(tmp_path, fake_trainer):
    sweep.main(["--learning_rate=2e-3", "--max_iters=10", "--trials=2", "--space", "learning_rate=loguniform(1e-4,1e-2)",
                "--sampler=random", f"--sweep_dir={tmp_path / 's'}"], train_command=fake_trainer)
    study = load_study(tmp_path / "s")
    assert study.trials[0].params == {"learning_rate": 2e-3} and study.trials[0].user_attrs["baseline"]
    assert "the config as given" in (tmp_path / "s" / "trials.md").read_text()


# -----------------------------------------------------------------------------
# Real trainings


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study_of_real_trainings(workdir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "tritongpt.sweep", *TINY, "--max_iters=20", "--eval_interval=10",
               "--space", "learning_rate=choice(1e-3,3e-3,1e-2)", "--sampler=grid", f"--sweep_dir={sweep_dir}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    workers = [subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, out + err
    study = load_study(sweep_dir)
    assert sorted(t.params["learning_rate"] for t in finished(study)) == [1e-3, 3e-3, 1e-2]
    assert len(study.trials) == 3
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2  # both workers ran trials
    for trial in study.trials:
        out_dir = sweep_dir / f"trial_{trial.number}"
        assert (out_dir / "ckpt.pt").exists() and (out_dir / "loss.png").exists()
        val = {r["iter"]: r["val_loss"] for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
               if "val_loss" in r}
        assert sorted(val) == [0, 10, 20] and trial.intermediate_values == val
        assert trial.value == min(val.values()) and trial.user_attrs["steps"] == 20
    best = min(study.trials, key=lambda t: t.value)
    assert f"best: trial {best.number}" in outputs[0][0] + outputs[1][0]
