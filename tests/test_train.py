"""train.py end to end on CPU: resume, checkpoints, divergence, and data errors (torchrun: test_distributed.py)."""
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from tritongpt import fileio
from tritongpt.checkpoint import load_file
from conftest import REPO
from model import GPT, GPTConfig

TINY = [
    "--device=cpu", "--dataset=shakespeare_char", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
    "--batch_size=4", "--eval_iters=3", "--log_interval=1", "--warmup_iters=5", "--learning_rate=3e-3",
    "--lr_decay_iters=30", "--min_lr=3e-4", "--compile=False", "--torch_threads=1",
]


def run_train(cwd, *args, check=True, env=None, launcher=None):
    command = (launcher or [sys.executable]) + [str(REPO / "train.py"), *TINY, *args]
    out = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def fault_env(tmp_path, action: str, after_steps: int, rank: int | None = None, env: dict | None = None) -> dict:
    """An environment whose Python processes load a sitecustomize that runs `action` (Python source, with os
    and signal imported) right after the `after_steps`-th optimizer step: in every process, or only in the
    torchrun worker of that rank, and only before any elastic restart. Faults come from outside train.py."""
    env = dict(os.environ if env is None else env)
    rank_check = "True" if rank is None else f"os.environ.get('RANK') == '{rank}'"
    (tmp_path / "sitecustomize.py").write_text(
        "import os\n"
        f"if {rank_check} and os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0':\n"
        "    import signal\n"
        "    import torch\n"
        "    from torch.optim.optimizer import register_optimizer_step_post_hook\n"
        "    steps = []\n"
        "    def fault(optimizer, args, kwargs):\n"
        "        steps.append(1)\n"
        f"        if len(steps) == {after_steps}:\n"
        f"            {action}\n"
        "    register_optimizer_step_post_hook(fault)\n"
    )
    return {**env, "PYTHONPATH": os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])}


def metrics(out_dir):
    """The records of metrics.jsonl, but for a torn line a test planted."""
    records = []
    with open(out_dir / "metrics.jsonl") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def val_losses(out_dir):
    return {m["iter"]: m["val_loss"] for m in metrics(out_dir) if "val_loss" in m}


def step_losses(out_dir):
    return {m["iter"]: m["loss"] for m in metrics(out_dir) if "loss" in m}


def test_resume_reproduces_uninterrupted_run(workdir):
    """Stop at iter 10, resume to 20: the same losses to the last bit (dropout on, so RNG state matters)."""
    common = ["--dropout=0.1", "--eval_interval=10", "--gradient_accumulation_steps=2"]
    run_train(workdir, *common, "--out_dir=full", "--max_iters=20")
    run_train(workdir, *common, "--out_dir=split", "--max_iters=10")
    run_train(workdir, *common, "--out_dir=split", "--max_iters=20", "--init_from=resume")
    full, split = step_losses(workdir / "full"), step_losses(workdir / "split")
    assert sorted(full) == list(range(20))  # max_iters steps, then the final eval and checkpoint
    assert {i: split[i] for i in range(10, 20)} == {i: full[i] for i in range(10, 20)}
    ckpt = load_file(workdir / "split" / "ckpt.pt")
    assert ckpt["iter_num"] == 20 and set(ckpt) >= {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"}
    assert set(ckpt["model_args"]) == {"n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout"}


def test_best_val_loss_is_never_overwritten_by_a_worse_one(workdir):
    out = workdir / "best"
    run_train(workdir, f"--out_dir={out.name}", "--max_iters=20", "--eval_interval=10")
    # resume with a learning rate far too high: the model gets worse, and is saved all the same
    run_train(workdir, f"--out_dir={out.name}", "--init_from=resume", "--max_iters=30", "--eval_interval=10",
              "--learning_rate=0.5", "--warmup_iters=0", "--decay_lr=False")
    vals = [m["val_loss"] for m in metrics(out) if "val_loss" in m]
    assert vals[-1] > min(vals), "the run must get worse at some eval for this test to mean anything"
    ckpt = load_file(out / "ckpt.pt")
    assert ckpt["iter_num"] == 30  # always_save_checkpoint saved the last weights...
    assert ckpt["best_val_loss"] == pytest.approx(min(vals))  # ...without forgetting the best loss


def test_nan_loss_stops_and_keeps_last_good_checkpoint(workdir):
    out = workdir / "nan"
    run_train(workdir, f"--out_dir={out.name}", "--max_iters=4", "--eval_interval=2")
    result = run_train(
        workdir, f"--out_dir={out.name}", "--init_from=resume", "--max_iters=400", "--eval_interval=2",
        "--learning_rate=1e30", "--warmup_iters=0", "--decay_lr=False", "--grad_clip=0.0", check=False,
    )
    assert result.returncode != 0
    assert "training diverged" in result.stderr and "Traceback" not in result.stderr
    ckpt = load_file(out / "ckpt.pt")
    assert ckpt["iter_num"] == 4  # the resumed run's first eval, before the first bad step
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_missing_dataset_names_the_prepare_command(tmp_path):
    result = run_train(tmp_path, "--max_iters=1", check=False)
    assert result.returncode != 0
    assert "python prepare/shakespeare_char.py" in result.stderr


def test_corrupt_data_is_a_clear_error(workdir, tmp_path):
    data = tmp_path / "data" / "shakespeare_char"
    shutil.copytree(workdir / "data" / "shakespeare_char", data)
    with open(data / "val.bin", "ab") as f:
        f.write(b"\x00")  # an odd byte count cannot be uint16 tokens
    result = run_train(tmp_path, "--max_iters=1", check=False)
    assert result.returncode != 0 and "val.bin" in result.stderr


def test_killed_checkpoint_write_leaves_old_checkpoint_loadable(tmp_path):
    """SIGKILL in the middle of writing: the previous checkpoint must still load."""
    path = tmp_path / "ckpt.pt"
    torch.save({"iter_num": 1, "w": torch.ones(3)}, path)
    code = (
        "import os, signal, torch; from tritongpt.fileio import atomic_open\n"
        f"with atomic_open({str(path)!r}) as f:\n"
        "    f.write(b'half a checkpoint')\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert torch.load(path, weights_only=True)["iter_num"] == 1


def test_eval_only_prints_loss_and_perplexity(workdir):
    result = run_train(workdir, "--out_dir=evalonly", "--eval_only=True", "--max_iters=100")
    val = float(result.stdout.split("val loss ")[1].split()[0])
    perplexity = float(result.stdout.split("val perplexity ")[1].split()[0])
    assert perplexity == pytest.approx(math.exp(val), rel=1e-3)
    assert "iter 0:" not in result.stdout  # no training step


def test_the_last_steps_are_evaluated_and_saved(workdir):
    """max_iters=7 is not a multiple of eval_interval=5: the run still ends with an eval and a checkpoint at 7,
    and its first log line has no ETA from the warm-up step."""
    out = workdir / "last"
    result = run_train(workdir, f"--out_dir={out.name}", "--max_iters=7", "--eval_interval=5")
    assert sorted(val_losses(out)) == [0, 5, 7]
    assert load_file(out / "ckpt.pt")["iter_num"] == 7
    assert "iter 0: " in result.stdout and "eta measuring" in result.stdout.split("iter 0: ")[1].splitlines()[0]
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_best_checkpoint_is_kept_and_resume_takes_the_latest(workdir):
    """always_save_checkpoint=False: ckpt.pt is the best model, never overwritten by a worse one; the latest
    state goes to ckpt_latest.pt, and init_from=resume continues from it."""
    out = workdir / "keep_best"
    common = [f"--out_dir={out.name}", "--eval_interval=5", "--always_save_checkpoint=False"]
    run_train(workdir, *common, "--max_iters=10")
    assert load_file(out / "ckpt.pt")["iter_num"] == 10 and not (out / "ckpt_latest.pt").exists()
    # far too high a learning rate: every later eval is worse
    run_train(workdir, *common, "--init_from=resume", "--max_iters=20", "--learning_rate=0.5", "--warmup_iters=0",
              "--decay_lr=False")
    vals = val_losses(out)
    assert vals[15] > vals[10] and vals[20] > vals[10]
    best, latest = load_file(out / "ckpt.pt"), load_file(out / "ckpt_latest.pt")
    assert best["iter_num"] == 10 and best["best_val_loss"] == pytest.approx(vals[10])
    assert latest["iter_num"] == 20 and latest["best_val_loss"] == pytest.approx(vals[10])
    result = run_train(workdir, *common, "--init_from=resume", "--max_iters=21")
    assert "resuming from keep_best/ckpt_latest.pt at iter 20" in result.stdout


def test_early_stopping_stops_after_patience_evals_without_improvement(workdir):
    out = workdir / "early"
    common = [f"--out_dir={out.name}", "--eval_interval=2", "--early_stopping_patience=2"]
    run_train(workdir, *common, "--max_iters=4")
    result = run_train(workdir, *common, "--init_from=resume", "--max_iters=100", "--learning_rate=0.5",
                       "--warmup_iters=0", "--decay_lr=False")
    assert sorted(val_losses(out)) == [0, 2, 4, 6, 8]  # 6 and 8 are worse than 4: two evals, then stop
    assert "early stopping at iter 8" in result.stdout and "for 2 evals" in result.stdout
    assert load_file(out / "ckpt.pt")["best_val_loss"] == pytest.approx(val_losses(out)[4])
    bad = run_train(workdir, "--early_stopping_patience=-1", "--max_iters=1", check=False)
    assert bad.returncode != 0 and "early_stopping_patience must be >= 0" in bad.stderr


def test_ctrl_c_saves_after_the_step_and_resume_continues_exactly(workdir, tmp_path):
    """SIGINT after the 7th step: the step finishes, the state is saved (between evals), the exit says how to
    resume, and the resumed run draws the very losses of an uninterrupted one (dropout on: RNG included)."""
    common = ["--dropout=0.1", "--eval_interval=5", "--gradient_accumulation_steps=2"]
    run_train(workdir, *common, "--out_dir=uninterrupted", "--max_iters=12")
    env = fault_env(tmp_path, "os.kill(os.getpid(), signal.SIGINT)", after_steps=7)
    stopped = run_train(workdir, *common, "--out_dir=interrupted", "--max_iters=12", env=env, check=False)
    assert stopped.returncode == 130, stopped.stderr
    assert "SIGINT received" in stopped.stderr and "stopped at iter 7" in stopped.stderr
    assert "--init_from=resume" in stopped.stderr and "Traceback" not in stopped.stderr
    assert load_file(workdir / "interrupted" / "ckpt.pt")["iter_num"] == 7
    run_train(workdir, *common, "--out_dir=interrupted", "--max_iters=12", "--init_from=resume")
    full, resumed = step_losses(workdir / "uninterrupted"), step_losses(workdir / "interrupted")
    assert {i: resumed[i] for i in range(12)} == full


def test_a_second_ctrl_c_aborts_at_once(workdir, tmp_path):
    env = fault_env(tmp_path, "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGINT)", after_steps=3)
    result = run_train(workdir, "--out_dir=aborted", "--max_iters=12", "--eval_interval=5", env=env, check=False)
    assert result.returncode != 0
    assert "aborted by a second Ctrl-C" in result.stderr and "Traceback" not in result.stderr
    assert not (workdir / "aborted" / "ckpt.pt").exists()  # nothing saved, nothing torn
    assert not [p for p in (workdir / "aborted").iterdir() if p.name.endswith(".tmp")]


def test_sigterm_exits_143_after_saving(workdir, tmp_path):
    env = fault_env(tmp_path, "os.kill(os.getpid(), signal.SIGTERM)", after_steps=3)
    result = run_train(workdir, "--out_dir=preempted", "--max_iters=12", "--eval_interval=5", env=env, check=False)
    assert result.returncode == 143 and "SIGTERM received" in result.stderr
    assert load_file(workdir / "preempted" / "ckpt.pt")["iter_num"] == 3


MODERN = ["--pos_embedding=rope", "--norm=rmsnorm", "--qk_norm=True", "--activation=relu2", "--tie_embeddings=False",
          "--logit_softcap=15.0", "--zero_init_proj=True", "--optimizer=muon", "--muon_lr=0.02"]


def test_modern_recipe_with_muon_resumes_exactly_and_samples(workdir):
    """Every switch on and Muon: stop at 5, resume to 10, the very losses of an uninterrupted run (dropout on);
    the checkpoint records the switches and sample.py rebuilds the model from them."""
    common = [*MODERN, "--dropout=0.1", "--eval_interval=5"]
    run_train(workdir, *common, "--out_dir=modern_full", "--max_iters=10")
    run_train(workdir, *common, "--out_dir=modern_split", "--max_iters=5")
    run_train(workdir, *common, "--out_dir=modern_split", "--max_iters=10", "--init_from=resume")
    full, split = step_losses(workdir / "modern_full"), step_losses(workdir / "modern_split")
    assert {i: split[i] for i in range(5, 10)} == {i: full[i] for i in range(5, 10)}
    ckpt = load_file(workdir / "modern_split" / "ckpt.pt")
    assert ckpt["model_args"]["pos_embedding"] == "rope" and ckpt["model_args"]["tie_embeddings"] is False
    assert {g["muon"] for g in ckpt["optimizer"]["param_groups"]} == {True, False}
    out = subprocess.run([sys.executable, str(REPO / "sample.py"), "--device=cpu", "--out_dir=modern_split",
                          "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=40", "--kv_roll=True"],
                         cwd=workdir, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("(its meta file)\n", 1)[1].startswith("ROMEO:")


def test_bad_recipe_values_are_clear_errors(workdir):
    for flag, message in (("--pos_embedding=alibi", "pos_embedding must be one of ('learned', 'rope')"),
                          ("--logit_softcap=-1.0", "logit_softcap must be 0 (off) or a positive cap"),
                          ("--optimizer=lion", "optimizer must be one of 'adamw', 'muon', got 'lion'")):
        result = run_train(workdir, flag, "--max_iters=1", "--out_dir=bad_recipe", check=False)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_bfloat16_trains_without_loss_scaling(workdir):
    """CPU autocast in bfloat16: it trains, and saves no GradScaler state (bf16 needs no loss scaling). Resuming
    exactly is dtype-independent, tested in float16 (below) and float32."""
    out = workdir / "amp_bfloat16"
    first = run_train(workdir, "--dtype=bfloat16", "--dropout=0.1", "--eval_interval=8", f"--out_dir={out.name}",
                      "--max_iters=8")
    assert "dtype bfloat16" in first.stdout
    vals = val_losses(out)
    assert vals[8] < vals[0] - 0.3
    assert load_file(out / "ckpt.pt")["scaler"] == {}


def test_float16_trains_and_resumes_exactly(workdir):
    """CPU autocast in train.py: stop at 4, resume to 8, the very weights of an uninterrupted run. float16 runs
    with a GradScaler, whose state (scale, steps since the last overflow) is saved and restored."""
    common = ["--dtype=float16", "--dropout=0.1", "--eval_interval=4"]
    full, split = workdir / "amp_float16_full", workdir / "amp_float16_split"
    first = run_train(workdir, *common, f"--out_dir={full.name}", "--max_iters=8")
    assert "dtype float16" in first.stdout
    run_train(workdir, *common, f"--out_dir={split.name}", "--max_iters=4")
    run_train(workdir, *common, f"--out_dir={split.name}", "--max_iters=8", "--init_from=resume")
    vals = val_losses(full)
    assert vals[8] < vals[0] - 0.3  # it trains
    assert val_losses(split) == vals  # the evals at 0, 4 and 8, to the last bit
    expected, actual = load_file(full / "ckpt.pt"), load_file(split / "ckpt.pt")
    for name, tensor in expected["model"].items():
        assert torch.equal(actual["model"][name], tensor), name
    assert expected["scaler"]["_growth_tracker"] == 8  # eight steps without an overflow: it was counting
    assert actual["scaler"] == expected["scaler"]


@pytest.mark.slow
def test_compile_on_cpu_trains(workdir):
    """torch.compile with the CPU backend: a few steps, a loss that falls, a checkpoint without compile's prefix."""
    out = workdir / "compiled"
    run_train(workdir, "--compile=True", f"--out_dir={out.name}", "--max_iters=6", "--eval_interval=6")
    vals = val_losses(out)
    assert math.isfinite(vals[6]) and vals[6] < vals[0]
    assert not any(name.startswith("_orig_mod.") for name in load_file(out / "ckpt.pt")["model"])


# -----------------------------------------------------------------------------
# Misuse and accidents: clear one-line errors, nothing that runs code, nothing that blocks the next run


class CreatesAFile:
    """Unpickling this calls open(path, "w"): any code could run in its place."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], result.stderr


def test_a_meta_pkl_that_would_run_code_runs_nothing(workdir, tmp_path):
    """A downloaded dataset's meta.pkl, or one that a downloaded model's config points sample.py at."""
    marker = tmp_path / "created_by_unpickling"
    evil = tmp_path / "data" / "evil"
    evil.mkdir(parents=True)
    for name in ("train.bin", "val.bin"):
        shutil.copy(workdir / "data" / "shakespeare_char" / name, evil)
    (evil / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 65, "itos": CreatesAFile(marker), "stoi": {}}))
    result = run_train(tmp_path, "--dataset=evil", "--max_iters=1", check=False)
    assert_one_line_error(result, "meta.pkl is not a usable dataset vocabulary", "names io.open")
    assert not marker.exists()
    model = GPT(GPTConfig(block_size=16, vocab_size=65, n_layer=1, n_head=2, n_embd=16))
    args = {k: getattr(model.config, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")}
    (tmp_path / "downloaded").mkdir()
    torch.save({"model": model.state_dict(), "model_args": args, "iter_num": 1, "best_val_loss": 2.0,
                "config": {"dataset": "fine", "data_dir": str(evil)}}, tmp_path / "downloaded" / "ckpt.pt")
    out = subprocess.run([sys.executable, str(REPO / "sample.py"), "--device=cpu", "--out_dir=downloaded"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert_one_line_error(out, "meta.pkl is not a usable dataset vocabulary")
    assert not marker.exists()


def tiny_split_dataset(workdir, root, name, val_tokens):
    directory = root / "data" / name
    directory.mkdir(parents=True)
    shutil.copy(workdir / "data" / "shakespeare_char" / "train.bin", directory)
    shutil.copy(workdir / "data" / "shakespeare_char" / "meta.json", directory)
    (directory / "val.bin").write_bytes(np.arange(val_tokens, dtype=np.uint16).tobytes())


def test_settings_and_files_that_cannot_work_end_in_one_line(workdir, tmp_path):
    """A few of the configurator's checks (each is tested in-process in test_config.py) and of the setup's,
    as the user sees them: one line that names the problem, no traceback, nothing trained."""
    tiny_split_dataset(workdir, tmp_path, "short_val", 20)
    tiny_split_dataset(workdir, tmp_path, "empty_val", 0)
    (tmp_path / "a_file").write_text("")
    cases = [
        (["--grad_clip=-1"], ["grad_clip must be >= 0 (0 turns clipping off), got -1.0"]),
        (["--out_dir=a_file"], ["out_dir='a_file' is a file, not a directory"]),
        (["--dataset=short_val"], ["val split", "too small for block_size=32", "has 20 tokens"]),
        (["--dataset=empty_val"], ["val split", "too small for block_size=32", "has 0 tokens"]),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device=cuda"], ["device='cuda', but PyTorch sees no CUDA GPU here"]))
    for flags, fragments in cases:
        assert_one_line_error(run_train(tmp_path, *flags, "--max_iters=1", check=False), *fragments)
    assert not list(tmp_path.glob("out/ckpt*"))


def test_resume_refuses_what_cannot_apply_and_is_never_blocked_by_a_crash(workdir):
    """On one out_dir: a torn metrics line and the temp file of a save killed by kill -9 do not block the
    resume (both are dealt with, and said); an architecture flag the checkpoint cannot take is refused; a
    checkpoint whose weights went NaN is refused without suggesting to resume it."""
    out = workdir / "mishaps"
    run_train(workdir, f"--out_dir={out.name}", "--max_iters=2", "--eval_interval=2")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"iter": 2, "loss": 4.')  # kill -9 in the middle of a write
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".ckpt.pt.{dead.pid}.0123abcd.{fileio._host()}.tmp"
    stale.write_bytes(b"half a checkpoint")
    result = run_train(workdir, f"--out_dir={out.name}", "--max_iters=4", "--eval_interval=2", "--init_from=resume")
    assert f"removed {out.name}/{stale.name}" in result.stdout and not stale.exists()
    assert "skipped 1 torn line(s)" in result.stderr
    assert sorted(val_losses(out)) == [0, 2, 4] and load_file(out / "ckpt.pt")["iter_num"] == 4

    refused = run_train(workdir, f"--out_dir={out.name}", "--max_iters=6", "--init_from=resume", "--n_layer=4",
                        check=False)
    assert_one_line_error(refused, "n_layer=4 (it has 2)", "cannot apply")
    same = run_train(workdir, f"--out_dir={out.name}", "--max_iters=5", "--eval_interval=5", "--init_from=resume",
                     "--n_layer=2")
    assert load_file(out / "ckpt.pt")["config"]["n_head"] == 2, same.stdout  # the model's, not the default 12

    state = torch.load(out / "ckpt.pt", weights_only=True)  # not memory-mapped: the file is written over next
    state["model"] = {name: torch.full_like(t, float("nan")) if "c_fc" in name else t for name, t in state["model"].items()}
    torch.save(state, out / "ckpt.pt")
    nan = run_train(workdir, f"--out_dir={out.name}", "--max_iters=8", "--init_from=resume", check=False)
    assert_one_line_error(nan, "holds non-finite weights", "resume from an earlier checkpoint or train again")
    assert "--init_from=resume" not in nan.stderr


def test_a_full_disk_names_the_file_and_keeps_the_last_checkpoint(workdir, tmp_path):
    out = workdir / "full_disk"
    run_train(workdir, f"--out_dir={out.name}", "--max_iters=2", "--eval_interval=2")
    before = (out / "ckpt.pt").read_bytes()
    env = fault_env(tmp_path, "import errno, torch\n"
                              "            def full(*args, **kwargs):\n"
                              "                raise OSError(errno.ENOSPC, 'No space left on device')\n"
                              "            torch.save = full", after_steps=1)
    result = run_train(workdir, f"--out_dir={out.name}", "--max_iters=4", "--eval_interval=2", "--init_from=resume",
                       check=False, env=env)
    assert_one_line_error(result, "no space left on the device holding", "writing ckpt.pt stopped after",
                          "it needs", "bytes are free there now")
    assert (out / "ckpt.pt").read_bytes() == before and not list(out.glob(".*.tmp"))


def test_a_plot_that_cannot_be_drawn_never_costs_the_checkpoint(workdir, tmp_path):
    out = workdir / "no_plot"
    env = fault_env(tmp_path, "import matplotlib.figure\n"
                              "            def broken(*args, **kwargs):\n"
                              "                raise RuntimeError('no fonts')\n"
                              "            matplotlib.figure.Figure.savefig = broken", after_steps=1)
    result = run_train(workdir, f"--out_dir={out.name}", "--max_iters=2", "--eval_interval=2", env=env)
    assert "warning: could not draw" in result.stderr and "no fonts" in result.stderr  # at the eval of iter 2
    assert load_file(out / "ckpt.pt")["iter_num"] == 2


def test_resumed_early_stopping_keeps_counting_evals_since_the_best(workdir):
    """With learning_rate 0 every eval equals the first (the same batches), so none improves: patience 3 stops
    at the third eval after iter 0, iter 6, whether the run stops at 4 (two evals counted) and resumes or not."""
    common = ["--eval_interval=2", "--early_stopping_patience=3", "--learning_rate=0", "--min_lr=0", "--max_iters=20"]
    whole = run_train(workdir, *common, "--out_dir=patience_whole")
    run_train(workdir, *common[:-1], "--out_dir=patience_split", "--max_iters=4")
    resumed = run_train(workdir, *common, "--out_dir=patience_split", "--init_from=resume")
    for result in (whole, resumed):
        assert "early stopping at iter 6" in result.stdout and "for 3 evals" in result.stdout
    assert load_file(workdir / "patience_split" / "ckpt.pt")["iter_num"] == 6


def test_zero_iterations_say_nothing_was_saved(workdir):
    result = run_train(workdir, "--out_dir=zero_steps", "--max_iters=0")
    assert "max_iters=0 and the run starts at iter 0: no step was taken, so nothing was saved" in result.stderr
    assert not (workdir / "zero_steps" / "ckpt.pt").exists()
