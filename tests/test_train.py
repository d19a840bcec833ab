"""train.py end to end on CPU: resume, checkpoints, divergence, data errors and DDP under torchrun."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO

TINY = [
    "--device=cpu", "--dataset=shakespeare_char", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
    "--batch_size=4", "--eval_iters=3", "--log_interval=1", "--warmup_iters=5", "--learning_rate=3e-3",
    "--lr_decay_iters=30", "--min_lr=3e-4", "--compile=False", "--torch_threads=1",
]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """A directory holding data/shakespeare_char, made by the real prepare script."""
    root = tmp_path_factory.mktemp("train")
    subprocess.run([sys.executable, str(REPO / "prepare" / "shakespeare_char.py")], cwd=root, check=True, capture_output=True, timeout=300)
    return root


def run_train(cwd, *args, check=True, env=None, launcher=None):
    command = (launcher or [sys.executable]) + [str(REPO / "train.py"), *TINY, *args]
    out = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def metrics(out_dir):
    with open(out_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def step_losses(out_dir):
    return {m["iter"]: m["loss"] for m in metrics(out_dir) if "loss" in m}


def test_resume_reproduces_uninterrupted_run(workdir):
    """Stop at iter 10, resume to 20: the same losses to the last bit (dropout on, so RNG state matters)."""
    common = ["--dropout=0.1", "--eval_interval=10", "--gradient_accumulation_steps=2"]
    run_train(workdir, *common, "--out_dir=full", "--max_iters=20")
    run_train(workdir, *common, "--out_dir=split", "--max_iters=10")
    run_train(workdir, *common, "--out_dir=split", "--max_iters=20", "--init_from=resume")
    full, split = step_losses(workdir / "full"), step_losses(workdir / "split")
    assert sorted(full) == list(range(21))
    assert {i: split[i] for i in range(10, 21)} == {i: full[i] for i in range(10, 21)}
    ckpt = torch.load(workdir / "split" / "ckpt.pt", weights_only=False)
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
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
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
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
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
        "import os, signal, torch; from data import atomic_open\n"
        f"with atomic_open({str(path)!r}) as f:\n"
        "    f.write(b'half a checkpoint')\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert torch.load(path, weights_only=False)["iter_num"] == 1


def test_torchrun_two_processes_match_one_process(workdir):
    """Two gloo processes with accumulation 1 each see the same global batch as one process with 2."""
    common = ["--max_iters=6", "--eval_interval=6", "--gradient_accumulation_steps=2", "--dropout=0.0"]
    run_train(workdir, *common, "--out_dir=single")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_train(workdir, *common, "--out_dir=ddp", launcher=torchrun, env=env)
    single, ddp = metrics(workdir / "single"), metrics(workdir / "ddp")
    single_vals = [m["val_loss"] for m in single if "val_loss" in m]
    ddp_vals = [m["val_loss"] for m in ddp if "val_loss" in m]
    assert ddp_vals == pytest.approx(single_vals, abs=1e-5)
    bad = run_train(workdir, "--max_iters=1", "--gradient_accumulation_steps=3", "--out_dir=bad", launcher=torchrun, env=env, check=False)
    assert bad.returncode != 0 and "not divisible by the 2 processes" in bad.stderr


def test_eval_only_prints_loss_and_perplexity(workdir):
    result = run_train(workdir, "--out_dir=evalonly", "--eval_only=True", "--max_iters=100")
    val = float(result.stdout.split("val loss ")[1].split()[0])
    perplexity = float(result.stdout.split("val perplexity ")[1].split()[0])
    assert perplexity == pytest.approx(math.exp(val), rel=1e-3)
    assert "iter 0:" not in result.stdout  # no training step
