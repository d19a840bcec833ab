"""train.py across processes on CPU, with gloo: DDP, FSDP, tensor and pipeline parallelism and their
compositions against one process (with two micro-steps per rank), sharded checkpoints (read directly by one
process and by sample.py, consolidated into ckpt.pt), resumes on other layouts, SIGTERM stopping every rank
at the same step, elastic restarts after a worker dies, and two "nodes" meeting through a c10d rendezvous.
Faults come from outside train.py: a sitecustomize module in the workers. Tests marked extra (4-process
variants of covered cases) run with --extra."""
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from tritongpt.checkpoint import build_model, find, load_file, read_checkpoint
from test_sample import run_sample
from test_train import TINY, fault_env, metrics, run_train

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# four micro-batches per iteration, so two per process with two: the accumulation path (no gradient sync on
# the first micro-step, each rank's own micro-batches) runs in every layout; a clip that acts at every step
COMMON = ["--eval_interval=3", "--gradient_accumulation_steps=4", "--grad_clip=0.5"]
TENSOR_PARALLEL = ["--tensor_parallel=2"]
PIPELINE = ["--pipeline_parallel=2"]


def standalone(nproc: int, *options: str) -> list[str]:
    return TORCHRUN + ["--standalone", f"--nproc_per_node={nproc}", *options]


def val_losses(out_dir) -> dict[int, float]:
    return {m["iter"]: m["val_loss"] for m in metrics(out_dir) if "val_loss" in m}


def model_from(path, sharded=False):
    return build_model(read_checkpoint(path, sharded), "sdpa", "torch")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory holding data/shakespeare_char, made by the real prepare script."""
    root = tmp_path_factory.mktemp("distributed")
    prepare = [sys.executable, str(REPO / "prepare" / "shakespeare_char.py")]
    subprocess.run(prepare, cwd=root, check=True, capture_output=True, timeout=300)
    return root


@pytest.fixture(scope="module")
def reference(workdir):
    """One process: 6 iterations (checkpoint kept as ckpt6.pt), then resumed to 9."""
    out = workdir / "one"
    run_train(workdir, *COMMON, f"--out_dir={out.name}", "--max_iters=6")
    shutil.copy(out / "ckpt.pt", out / "ckpt6.pt")
    run_train(workdir, *COMMON, f"--out_dir={out.name}", "--max_iters=9", "--init_from=resume")
    return out


@pytest.fixture(scope="module")
def ddp_run(workdir):
    """Two DDP processes, 6 iterations."""
    run_train(workdir, *COMMON, "--out_dir=ddp", "--max_iters=6", launcher=standalone(2), env=ENV)
    return workdir / "ddp"


def assert_same_weights(path, expected_path, atol=1e-5):
    """A checkpoint's weights (ckpt.pt, or a sharded ckpt_dcp/ read into one plain model: c_attn back in
    nanoGPT's order) are the expected checkpoint's."""
    expected = load_file(expected_path)["model"]
    sharded = path.is_dir()
    actual = model_from(path, sharded=True).state_dict() if sharded else load_file(path)["model"]
    assert set(actual) >= set(expected) if sharded else actual.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


def assert_losses_match(out_dir, reference, iters=(0, 3, 6)):
    """The val losses a run logged at `iters` are one process's, to 1e-5."""
    ref = val_losses(reference)
    assert val_losses(out_dir) == pytest.approx({i: ref[i] for i in iters}, abs=1e-5)


def test_ddp_matches_one_process(ddp_run, reference):
    assert_losses_match(ddp_run, reference)
    assert_same_weights(ddp_run / "ckpt.pt", reference / "ckpt6.pt")


def test_ddp_resumes_with_another_number_of_processes(workdir, ddp_run, reference):
    """Saved by 2 processes, resumed by 1; saved by 1, resumed by 2: both end where one process does."""
    ref = val_losses(reference)
    two_to_one = workdir / "ddp_2to1"
    two_to_one.mkdir()
    shutil.copy(ddp_run / "ckpt.pt", two_to_one / "ckpt.pt")
    run_train(workdir, *COMMON, f"--out_dir={two_to_one.name}", "--max_iters=9", "--init_from=resume")
    one_to_two = workdir / "ddp_1to2"
    one_to_two.mkdir()
    shutil.copy(reference / "ckpt6.pt", one_to_two / "ckpt.pt")
    run_train(workdir, *COMMON, f"--out_dir={one_to_two.name}", "--max_iters=9", "--init_from=resume",
              launcher=standalone(2), env=ENV)
    for out in (two_to_one, one_to_two):
        assert val_losses(out) == pytest.approx({6: ref[6], 9: ref[9]}, abs=1e-5)
        assert_same_weights(out / "ckpt.pt", reference / "ckpt.pt")


@pytest.fixture(scope="module")
def fsdp_run(workdir):
    """Two FSDP processes, 6 iterations."""
    run_train(workdir, *COMMON, "--out_dir=fsdp", "--max_iters=6", "--parallel=fsdp", launcher=standalone(2), env=ENV)
    return workdir / "fsdp"


def test_fsdp_matches_one_process(fsdp_run, reference):
    assert_losses_match(fsdp_run, reference)
    files = set(os.listdir(fsdp_run / "ckpt_dcp"))
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "train_state.pt"} <= files  # one shard file per rank
    assert not (fsdp_run / "ckpt.pt").exists() and not (fsdp_run / "ckpt_dcp.tmp").exists()


def test_one_process_and_sample_py_read_the_sharded_checkpoint(workdir, fsdp_run):
    """No consolidation needed: a non-FSDP resume and sample.py load ckpt_dcp/ as it is."""
    fsdp_val = val_losses(fsdp_run)[6]
    run_train(workdir, f"--out_dir={fsdp_run.name}", "--init_from=resume", "--eval_only=True")
    assert val_losses(fsdp_run)[6] == pytest.approx(fsdp_val, abs=1e-6)  # the FSDP model's outputs, to 1e-6
    out = run_sample(workdir, f"--out_dir={fsdp_run.name}", "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=20")
    assert out.stdout.split("(its meta file)\n", 1)[1].startswith("ROMEO:")


def test_consolidated_checkpoint_is_the_fsdp_model(workdir, fsdp_run, reference):
    run_train(workdir, f"--out_dir={fsdp_run.name}", "--consolidate=True")
    ckpt = load_file(fsdp_run / "ckpt.pt")
    assert set(ckpt) >= {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"}
    assert ckpt["iter_num"] == 6
    # the same weights and optimizer state as the one-process run at the same iteration...
    one = load_file(reference / "ckpt6.pt")
    assert_same_weights(fsdp_run / "ckpt.pt", reference / "ckpt6.pt")
    assert ckpt["optimizer"]["param_groups"] == one["optimizer"]["param_groups"]
    for index, state in one["optimizer"]["state"].items():
        assert ckpt["optimizer"]["state"][index]["step"] == state["step"] == 6
        torch.testing.assert_close(ckpt["optimizer"]["state"][index]["exp_avg"], state["exp_avg"], atol=1e-6, rtol=0)
    # ...and the same model whether read from the shards or from the consolidated file
    idx = torch.randint(0, ckpt["model_args"]["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    logits, _ = model_from(fsdp_run / "ckpt.pt")(idx, idx)
    torch.testing.assert_close(model_from(fsdp_run / "ckpt_dcp", sharded=True)(idx, idx)[0], logits, atol=0, rtol=0)
    torch.testing.assert_close(model_from(reference / "ckpt6.pt")(idx, idx)[0], logits, atol=1e-4, rtol=0)


def test_fsdp_resumes_from_a_one_process_checkpoint(workdir, reference):
    """ckpt.pt (weights and index-keyed AdamW state) sharded into FSDP by torch's state-dict helpers."""
    out = workdir / "fsdp_from_plain"
    out.mkdir()
    shutil.copy(reference / "ckpt6.pt", out / "ckpt.pt")
    run_train(workdir, *COMMON, f"--out_dir={out.name}", "--max_iters=9", "--parallel=fsdp", "--init_from=resume",
              launcher=standalone(2), env=ENV)
    assert val_losses(out)[9] == pytest.approx(val_losses(reference)[9], abs=1e-5)


def test_fsdp_resumes_with_another_number_of_processes(workdir, fsdp_run, reference):
    """Saved by 2 processes, resumed by 1: DCP reshards the model and the optimizer state."""
    out = workdir / "fsdp_resharded"
    shutil.copytree(fsdp_run / "ckpt_dcp", out / "ckpt_dcp")
    run_train(workdir, *COMMON, f"--out_dir={out.name}", "--max_iters=9", "--parallel=fsdp", "--init_from=resume",
              launcher=standalone(1), env=ENV)
    ref = val_losses(reference)
    assert val_losses(out) == pytest.approx({6: ref[6], 9: ref[9]}, abs=1e-5)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp", pytest.param("tensor", marks=pytest.mark.extra),
                                      pytest.param("pipeline", marks=pytest.mark.extra)])
def test_elastic_restart_resumes_from_the_last_checkpoint(workdir, reference, parallel, tmp_path):
    """Rank 1 dies after 5 steps (checkpoint at 3); torchrun restarts both workers, which resume at 3 by themselves."""
    out = workdir / f"elastic_{parallel}"
    # without TORCH_DISABLE_SHARE_RDZV_TCP_STORE the restarted workers may dial the dead ones (docs/scaling.md)
    env = {**fault_env(tmp_path, "os._exit(1)", after_steps=5, rank=1, env=ENV), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    layout = {"tensor": TENSOR_PARALLEL, "pipeline": PIPELINE}.get(parallel, [f"--parallel={parallel}"])
    run_train(workdir, *COMMON, *layout, f"--out_dir={out.name}", "--max_iters=6",
              launcher=standalone(2, "--max-restarts=1"), env=env)
    assert [m for m in metrics(out) if "event" in m] == [{"iter": 3, "event": "resume", "restart": 1}]
    assert_losses_match(out, reference)
    if parallel != "ddp":  # a sharded checkpoint
        run_train(workdir, f"--out_dir={out.name}", "--consolidate=True")
    ckpt = load_file(out / "ckpt.pt")
    # iterations 3 and on ran twice, but their first run's effect was lost with the worker: 6 steps in all
    assert ckpt["iter_num"] == 6
    assert {state["step"].item() for state in ckpt["optimizer"]["state"].values()} == {6}


def test_sigterm_stops_every_rank_at_the_same_step_and_resume_continues(workdir, reference, tmp_path):
    """SIGTERM reaches rank 1 only, after its 5th step: both ranks agree to stop after that step, save it
    together (DDP: ckpt.pt) and exit 143; the resumed run then ends where an uninterrupted one does."""
    out = workdir / "sigterm"
    env = fault_env(tmp_path, "os.kill(os.getpid(), signal.SIGTERM)", after_steps=5, rank=1, env=ENV)
    stopped = run_train(workdir, *COMMON, f"--out_dir={out.name}", "--max_iters=9", launcher=standalone(2), env=env,
                        check=False)
    assert stopped.returncode != 0
    assert "SIGTERM received" in stopped.stderr and "stopped at iter 5" in stopped.stderr
    assert re.search(r"exitcode\s*:\s*143", stopped.stderr)  # torchrun's report of the workers: 128 + SIGTERM
    assert load_file(out / "ckpt.pt")["iter_num"] == 5  # not an eval point: saved by the signal
    run_train(workdir, *COMMON, f"--out_dir={out.name}", "--max_iters=6", "--init_from=resume",
              launcher=standalone(2), env=ENV)
    assert val_losses(out)[6] == pytest.approx(val_losses(reference)[6], abs=1e-5)
    assert_same_weights(out / "ckpt.pt", reference / "ckpt6.pt")


def test_two_nodes_meet_through_c10d_rendezvous(workdir, reference, tmp_path):
    """Two torchrun launchers of one process each, as on two machines, rendezvous at 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = TORCHRUN + ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes"]
    command = launcher + [str(REPO / "train.py"), *TINY, *COMMON, "--out_dir=nodes", "--max_iters=6"]
    logs = [tmp_path / f"node{n}.log" for n in range(2)]
    nodes = []
    for log in logs:
        with open(log, "w") as f:
            nodes.append(subprocess.Popen(command, cwd=workdir, env=ENV, stdout=f, stderr=subprocess.STDOUT))
    for node, log in zip(nodes, logs):
        assert node.wait(timeout=300) == 0, log.read_text()
    assert "2 process(es)" in logs[0].read_text() + logs[1].read_text()
    assert_losses_match(workdir / "nodes", reference)


def test_parallel_mistakes_are_clear_errors(workdir):
    no_torchrun = run_train(workdir, "--parallel=fsdp", "--max_iters=1", check=False)
    assert no_torchrun.returncode != 0 and "run under torchrun" in no_torchrun.stderr
    unknown = run_train(workdir, "--parallel=zero3", "--max_iters=1", check=False)
    assert unknown.returncode != 0 and "parallel must be one of 'ddp', 'fsdp', got 'zero3'" in unknown.stderr
    nothing = run_train(workdir, "--out_dir=empty", "--consolidate=True", check=False)
    assert nothing.returncode != 0 and "ckpt_dcp" in nothing.stderr and "not found" in nothing.stderr
    indivisible = run_train(workdir, "--max_iters=1", "--gradient_accumulation_steps=3", "--out_dir=bad",
                            launcher=standalone(2), env=ENV, check=False)
    assert indivisible.returncode != 0 and "not divisible by the 2 processes" in indivisible.stderr
    assert "Traceback" not in no_torchrun.stderr + unknown.stderr + nothing.stderr
    assert 'train.py", line' not in indivisible.stderr  # torchrun prints its own traceback, but none from ours


# -----------------------------------------------------------------------------
# Tensor parallelism, alone and with a data-parallel dimension (4 processes)



@pytest.fixture(scope="module")
def tp_run(workdir):
    """Two processes splitting every layer, 6 iterations."""
    out = run_train(workdir, *COMMON, *TENSOR_PARALLEL, "--out_dir=tp", "--max_iters=6", launcher=standalone(2),
                    env=ENV)
    assert "(data parallel 1 x pipeline parallel 1 x tensor parallel 2)" in out.stdout
    return workdir / "tp"


def test_tensor_parallel_matches_one_process(tp_run, reference):
    assert_losses_match(tp_run, reference)
    assert_same_weights(tp_run / "ckpt_dcp", reference / "ckpt6.pt")


def resume_on_layouts(workdir, reference, saved: Path, runs: dict[str, tuple[list[str], list[str] | None]]):
    """Copy `saved` (a run's out_dir, or one process's ckpt6.pt) into a fresh out_dir per run, resume each with
    its options and launcher to iteration 9, and check it ends where one process does, from the losses at 6
    and 9 to every weight (so the optimizer state came along too)."""
    ref = val_losses(reference)
    for name, (options, launcher) in runs.items():
        out = workdir / name
        if saved.is_dir():
            shutil.copytree(saved / "ckpt_dcp", out / "ckpt_dcp")
        else:
            out.mkdir()
            shutil.copy(saved, out / "ckpt.pt")
        run_train(workdir, *COMMON, *options, f"--out_dir={name}", "--max_iters=9", "--init_from=resume",
                  launcher=launcher, env=ENV)
        assert val_losses(out) == pytest.approx({6: ref[6], 9: ref[9]}, abs=1e-5), name
        newest = find(out, latest=True)  # what a resume would take: ckpt.pt (one process, DDP) or ckpt_dcp/
        assert newest.iter_num == 9
        assert_same_weights(newest.path, reference / "ckpt.pt")


def test_tensor_parallel_resumes_on_other_layouts(workdir, tp_run, reference):
    """tp2 -> one process (DCP shards), tp2 -> fsdp2 x tp2 (4 processes), one process -> tp2 (ckpt.pt)."""
    resume_on_layouts(workdir, reference, tp_run, {"tp_to_one": ([], None), "tp_to_fsdp_tp": (
        ["--parallel=fsdp", *TENSOR_PARALLEL], standalone(4))})
    resume_on_layouts(workdir, reference, reference / "ckpt6.pt", {"one_to_tp": (TENSOR_PARALLEL, standalone(2))})


def test_sample_py_and_consolidation_read_a_tensor_parallel_checkpoint(workdir, tp_run, reference):
    out = run_sample(workdir, f"--out_dir={tp_run.name}", "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=20")
    assert out.stdout.split("(its meta file)\n", 1)[1].startswith("ROMEO:")
    consolidated = workdir / "tp_consolidated"
    shutil.copytree(tp_run / "ckpt_dcp", consolidated / "ckpt_dcp")
    run_train(workdir, f"--out_dir={consolidated.name}", "--consolidate=True")
    assert_same_weights(consolidated / "ckpt.pt", reference / "ckpt6.pt")
    one = load_file(reference / "ckpt6.pt")["optimizer"]
    merged = load_file(consolidated / "ckpt.pt")["optimizer"]
    for index, state in one["state"].items():  # c_attn's moments back in nanoGPT's order too
        torch.testing.assert_close(merged["state"][index]["exp_avg"], state["exp_avg"], atol=1e-6, rtol=0)


def test_tensor_parallel_runs_every_model_switch(workdir):
    """RoPE, RMSNorm, QK-norm, ReLU², an untied head, softcap, zero-init projections and biases: tp2 computes
    what one process does."""
    switches = ["--pos_embedding=rope", "--norm=rmsnorm", "--qk_norm=True", "--activation=relu2",
                "--tie_embeddings=False", "--logit_softcap=15", "--zero_init_proj=True", "--bias=True"]
    run_train(workdir, *COMMON, *switches, "--out_dir=switches_one", "--max_iters=3")
    run_train(workdir, *COMMON, *switches, *TENSOR_PARALLEL, "--out_dir=switches_tp", "--max_iters=3",
              launcher=standalone(2), env=ENV)
    assert val_losses(workdir / "switches_tp") == pytest.approx(val_losses(workdir / "switches_one"), abs=1e-5)
    assert_same_weights(workdir / "switches_tp" / "ckpt_dcp", workdir / "switches_one" / "ckpt.pt")


@pytest.mark.extra
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_data_and_tensor_parallel_match_one_process(workdir, reference, parallel):
    """dp2 x tp2 from scratch (the fsdp variant's resume is in the default run), then its checkpoint
    resumed by plain data parallelism."""
    out = workdir / f"dp_tp_{parallel}"
    run_train(workdir, *COMMON, *TENSOR_PARALLEL, f"--parallel={parallel}", f"--out_dir={out.name}", "--max_iters=6",
              launcher=standalone(4), env=ENV)
    assert_losses_match(out, reference)
    run_train(workdir, *COMMON, "--parallel=fsdp", f"--out_dir={out.name}", "--max_iters=9", "--init_from=resume",
              launcher=standalone(2), env=ENV)
    assert_losses_match(out, reference, iters=(9,))


@pytest.mark.extra
def test_sigterm_under_tensor_parallel_saves_and_resumes(workdir, reference, tmp_path):
    out = workdir / "tp_sigterm"
    env = fault_env(tmp_path, "os.kill(os.getpid(), signal.SIGTERM)", after_steps=5, rank=1, env=ENV)
    stopped = run_train(workdir, *COMMON, *TENSOR_PARALLEL, f"--out_dir={out.name}", "--max_iters=9",
                        launcher=standalone(2), env=env, check=False)
    assert stopped.returncode != 0 and "stopped at iter 5" in stopped.stderr
    run_train(workdir, *COMMON, *TENSOR_PARALLEL, f"--out_dir={out.name}", "--max_iters=6", "--init_from=resume",
              launcher=standalone(2), env=ENV)
    assert val_losses(out)[6] == pytest.approx(val_losses(reference)[6], abs=1e-5)
    assert_same_weights(out / "ckpt_dcp", reference / "ckpt6.pt")


def test_tensor_parallel_mistakes_are_clear_errors(workdir):
    """Each check's message is in test_parallelism.py; here, that train.py stops with it, before any work."""
    one_process = run_train(workdir, *TENSOR_PARALLEL, "--max_iters=1", "--out_dir=bad", check=False)
    assert one_process.returncode != 0
    assert "cannot be split into groups of tensor_parallel x pipeline_parallel = 2 x 1" in one_process.stderr
    assert "Traceback" not in one_process.stderr


@pytest.mark.extra
def test_tensor_parallel_checks_stop_torchrun_before_any_work(workdir):
    heads = run_train(workdir, *TENSOR_PARALLEL, "--n_head=1", "--max_iters=1", "--out_dir=bad",
                      launcher=standalone(2), env=ENV, check=False)
    assert heads.returncode != 0 and "n_head=1 must be divisible" in heads.stderr
    assert 'train.py", line' not in heads.stderr


# -----------------------------------------------------------------------------
# Pipeline parallelism, alone and with data and tensor parallelism



@pytest.fixture(scope="module")
def pp_run(workdir):
    """Two pipeline stages (one layer each), 1F1B over the 4 accumulation micro-batches, 6 iterations."""
    out = run_train(workdir, *COMMON, *PIPELINE, "--out_dir=pp", "--max_iters=6", launcher=standalone(2), env=ENV)
    assert "layers per stage 1,1, schedule 1f1b, 4 micro-batches per step; bubble 20.0%" in out.stdout
    return workdir / "pp"


def test_pipeline_matches_one_process(pp_run, reference):
    """Tied embeddings across the two stages included: their gradients are summed between first and last."""
    assert_losses_match(pp_run, reference)
    assert_same_weights(pp_run / "ckpt_dcp", reference / "ckpt6.pt")
    out = run_sample(pp_run.parent, f"--out_dir={pp_run.name}", "--start=ROMEO:", "--num_samples=1",
                     "--max_new_tokens=20")
    assert out.stdout.split("(its meta file)\n", 1)[1].startswith("ROMEO:")


def test_pipeline_resumes_from_one_process(workdir, reference):
    """one process (ckpt.pt) -> pp2."""
    resume_on_layouts(workdir, reference, reference / "ckpt6.pt", {"one_to_pp": (PIPELINE, standalone(2))})


@pytest.mark.extra
def test_pipeline_resumes_on_a_composed_layout(workdir, pp_run, reference):
    """pp2 -> fsdp2 x pp2 (4 processes; the default run resumes tp2 on fsdp2 x tp2, and pp2 on DDP)."""
    resume_on_layouts(workdir, reference, pp_run, {"pp_to_fsdp_pp": (["--parallel=fsdp", *PIPELINE], standalone(4))})


def test_pipeline_checkpoint_resumes_without_a_pipeline(workdir, pp_run, reference):
    resume_on_layouts(workdir, reference, pp_run, {"pp_to_ddp": ([], standalone(2))})


def test_interleaved_pipeline_matches_one_process(workdir):
    """Two stages per rank (4 layers: stages 0 and 2 on rank 0, 1 and 3 on rank 1), an untied head."""
    options = [*COMMON, "--n_layer=4", "--tie_embeddings=False", "--max_iters=3"]
    run_train(workdir, *options, "--out_dir=four_layers")
    out = run_train(workdir, *options, *PIPELINE, "--pipeline_schedule=interleaved_1f1b", "--out_dir=interleaved",
                    launcher=standalone(2), env=ENV)
    assert "2 ranks x 2 stage(s), layers per stage 1,1,1,1" in out.stdout and "bubble 11.1%" in out.stdout
    assert val_losses(workdir / "interleaved") == pytest.approx(val_losses(workdir / "four_layers"), abs=1e-5)
    assert_same_weights(workdir / "interleaved" / "ckpt_dcp", workdir / "four_layers" / "ckpt.pt")


@pytest.mark.extra
@pytest.mark.parametrize("options", [
    ["--pipeline_schedule=gpipe"],
    ["--parallel=ddp", "--nproc=4"],
    ["--tensor_parallel=2", "--nproc=4"],
], ids=["gpipe", "ddp2_x_pp2", "pp2_x_tp2"])
def test_other_pipeline_layouts_match_one_process(workdir, reference, options):
    nproc = 4 if "--nproc=4" in options else 2
    options = [option for option in options if not option.startswith("--nproc")]
    out = workdir / ("pp_" + "_".join(option.strip("-").replace("=", "") for option in options))
    run_train(workdir, *COMMON, *PIPELINE, *options, f"--out_dir={out.name}", "--max_iters=6",
              launcher=standalone(nproc), env=ENV)
    assert_losses_match(out, reference)
    assert_same_weights(out / "ckpt_dcp", reference / "ckpt6.pt")


@pytest.mark.extra
def test_triton_kernels_run_on_the_local_shards(workdir):
    """Our attention and norm kernels (Triton's interpreter on CPU) under tp2: each rank's heads only."""
    kernels = ["--attn_impl=triton", "--ln_impl=triton", "--eval_iters=1", "--eval_interval=2", "--max_iters=2",
               "--gradient_accumulation_steps=2"]
    env = {**ENV, "TRITON_INTERPRET": "1"}
    run_train(workdir, *kernels, "--out_dir=triton_one", env=env)
    run_train(workdir, *kernels, *TENSOR_PARALLEL, "--out_dir=triton_tp", launcher=standalone(2), env=env)
    assert val_losses(workdir / "triton_tp") == pytest.approx(val_losses(workdir / "triton_one"), abs=1e-5)
