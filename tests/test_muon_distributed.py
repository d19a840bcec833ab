"""Muon across processes (tritongpt/optim.py: orthogonalize): the Newton-Schulz work shared among the ranks
that hold each matrix, under DDP, FSDP2, tensor parallelism and FSDP with tensor parallelism, equal to one
process; and train.py with optimizer='muon' under FSDP matching one process and resuming across layouts
through DCP with Muon's momentum intact. CPU, gloo, float32."""
import json
import shutil
import subprocess

import pytest
import torch

from conftest import REPO
from test_distributed import COMMON, ENV, assert_losses_match, assert_same_weights, standalone, val_losses
from test_train import run_train
from tritongpt import optim
from tritongpt.fileio import load_file

MUON = ["--optimizer=muon", "--muon_lr=0.02"]


# -----------------------------------------------------------------------------
# The optimizer on its own


def gpt2_shapes(n_layer: int = 12, width: int = 768) -> list[tuple[int, int]]:
    """GPT-2's block matrices: c_attn, the attention's c_proj, c_fc and the MLP's c_proj, per layer."""
    return [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width)] * n_layer


@pytest.mark.parametrize("slots", [2, 3, 4, 8])
def test_owners_share_the_newton_schulz_work_evenly(slots):
    costs = [optim.newton_schulz_cost(torch.Size(shape)) for shape in gpt2_shapes()]
    owners = optim.assign_owners(costs, slots)
    loads = [sum(c for c, owner in zip(costs, owners) if owner == slot) for slot in range(slots)]
    assert sorted(set(owners)) == list(range(slots))
    assert max(loads) <= 1.1 * sum(costs) / slots  # within 10% of a perfect share
    assert optim.assign_owners(costs, slots) == owners  # every process computes the same assignment


def test_the_cost_is_the_short_sides_gram_matrix_times_the_long_side():
    assert optim.newton_schulz_cost(torch.Size((2304, 768))) == 768 * 768 * 2304
    assert optim.newton_schulz_cost(torch.Size((768, 3072))) == optim.newton_schulz_cost(torch.Size((3072, 768)))


def test_alone_each_update_is_orthogonalized_in_place_of_itself():
    torch.manual_seed(0)
    updates = [torch.randn(24, 40), torch.randn(64, 16), torch.randn(8, 8)]
    for dtype in (torch.float32, torch.bfloat16):
        results = optim.orthogonalize(updates, dtype, 1e-7)
        for update, result in zip(updates, results):
            assert torch.equal(result, optim.newton_schulz(update, dtype, 1e-7))


def run_worker(layout: str, nproc: int, tmp_path) -> list[dict]:
    out = tmp_path / layout
    command = standalone(nproc) + [str(REPO / "bench" / "muon.py"), f"--check={layout}", f"--check_out={out}"]
    result = subprocess.run(command, cwd=REPO, env={**ENV, "PYTHONPATH": str(REPO)}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return [json.loads((tmp_path / f"{layout}.{rank}.json").read_text()) for rank in range(nproc)]


@pytest.mark.parametrize("layout, nproc", [("ddp", 2), ("fsdp", 2), ("tp", 2),
                                           pytest.param("fsdp_tp", 4, marks=pytest.mark.extra)])
def test_muon_across_processes_is_one_processs_muon(layout, nproc, tmp_path):
    """Three steps with the same gradients: the weights are one process's (DDP and FSDP to the bit: the owner
    runs the same iterations on the same whole matrix; tensor parallelism to 1e-6, its c_attn rows being in
    another order), every rank holds the same model, and each matrix is orthogonalized once per step."""
    reports = run_worker(layout, nproc, tmp_path)
    steps, matrices = 3, reports[0]["matrices"]
    for report in reports:
        assert report["max_relative_error"] <= (0.0 if layout in ("ddp", "fsdp") else 1e-6)
        assert report["checksums"] == reports[0]["checksums"]
    calls = [report["ns_calls"] for report in reports]
    assert sum(calls) == steps * matrices
    if layout != "fsdp_tp":  # on a 2-D mesh the owners are the diagonal ranks (0, 0) and (1, 1)
        assert calls == [steps * matrices // nproc] * nproc


# -----------------------------------------------------------------------------
# train.py


@pytest.fixture(scope="module")
def muon_reference(workdir):
    """One process with Muon: 6 iterations (checkpoint kept as ckpt6.pt), then resumed to 9."""
    out = workdir / "muon_one"
    run_train(workdir, *COMMON, *MUON, f"--out_dir={out.name}", "--max_iters=6")
    shutil.copy(out / "ckpt.pt", out / "ckpt6.pt")
    run_train(workdir, *COMMON, *MUON, f"--out_dir={out.name}", "--max_iters=9", "--init_from=resume")
    return out


def momentum_buffers(checkpoint: dict) -> dict:
    state = checkpoint["optimizer"]["state"]
    return {key: entry["momentum_buffer"] for key, entry in state.items() if "momentum_buffer" in entry}


def test_fsdp_with_muon_matches_one_process_and_resumes_across_layouts(workdir, muon_reference):
    fsdp = workdir / "muon_fsdp"
    run_train(workdir, *COMMON, *MUON, f"--out_dir={fsdp.name}", "--max_iters=6", "--parallel=fsdp",
              launcher=standalone(2), env=ENV)
    assert_losses_match(fsdp, muon_reference)
    # Muon's momentum, sharded in DCP, is one process's: consolidated into one ckpt.pt, it is the same
    run_train(workdir, f"--out_dir={fsdp.name}", "--consolidate=True")
    consolidated, one = load_file(fsdp / "ckpt.pt"), load_file(muon_reference / "ckpt6.pt")
    assert_same_weights(fsdp / "ckpt.pt", muon_reference / "ckpt6.pt")
    ours, expected = momentum_buffers(consolidated), momentum_buffers(one)
    assert len(expected) == 4 * one["model_args"]["n_layer"] and ours.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(ours[key], expected[key], atol=1e-6, rtol=0)
    (fsdp / "ckpt.pt").unlink()
    # saved by FSDP x2, resumed by one process; saved by one, resumed by FSDP x2: both end where one process does
    run_train(workdir, *COMMON, *MUON, f"--out_dir={fsdp.name}", "--max_iters=9", "--init_from=resume")
    one_to_fsdp = workdir / "muon_1tofsdp"
    one_to_fsdp.mkdir()
    shutil.copy(muon_reference / "ckpt6.pt", one_to_fsdp / "ckpt.pt")
    run_train(workdir, *COMMON, *MUON, f"--out_dir={one_to_fsdp.name}", "--max_iters=9", "--init_from=resume",
              "--parallel=fsdp", launcher=standalone(2), env=ENV)
    ref = val_losses(muon_reference)
    assert val_losses(fsdp)[9] == pytest.approx(ref[9], abs=1e-5)
    assert val_losses(one_to_fsdp)[9] == pytest.approx(ref[9], abs=1e-5)
    assert_same_weights(fsdp / "ckpt.pt", muon_reference / "ckpt.pt")
    assert_same_weights(one_to_fsdp / "ckpt_dcp", muon_reference / "ckpt.pt")


@pytest.mark.extra
@pytest.mark.parametrize("nproc, options", [(2, []), (2, ["--tensor_parallel=2"]), (2, ["--pipeline_parallel=2"]),
                                            (4, ["--tensor_parallel=2"]), (4, ["--pipeline_parallel=2"])],
                         ids=["ddp", "tensor", "pipeline", "data x tensor", "data x pipeline"])
def test_other_layouts_with_muon_match_one_process(workdir, muon_reference, nproc, options):
    """Under data x pipeline, each stage's matrices are replicated DTensors (FSDP's engine): a broadcast."""
    out = workdir / f"muon_{nproc}_{options[0][2:].split('=')[0] if options else 'ddp'}"
    run_train(workdir, *COMMON, *MUON, *options, f"--out_dir={out.name}", "--max_iters=6",
              launcher=standalone(nproc), env=ENV)
    assert_losses_match(out, muon_reference)
    assert_same_weights(out / ("ckpt_dcp" if options else "ckpt.pt"), muon_reference / "ckpt6.pt")


def test_the_bench_times_each_layout_and_counts_what_each_process_sends(tmp_path):
    command = standalone(2) + [str(REPO / "bench" / "muon.py"), "--quick", "--device=cpu", f"--out={tmp_path}"]
    result = subprocess.run(command, cwd=REPO, env={**ENV, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {(row["layout"], row["optimizer"]): row for row in json.loads((tmp_path / "muon.json").read_text())["rows"]}
    assert list(rows) == [("ddp", "adamw"), ("ddp_unshared", "muon"), ("ddp", "muon"), ("fsdp", "muon"), ("tp", "muon")]
    assert all(row["step_ms"] > 0 for row in rows.values())
    # the quick model's 8 Muon matrices hold 2 x (96x32 + 32x32 + 128x32 + 32x128) floats: 96 KiB in float32
    matrices_mib = 2 * (96 * 32 + 32 * 32 + 2 * 128 * 32) * 4 / 2**20
    assert rows[("ddp", "adamw")]["sent_MiB"] < 0.001 and rows[("ddp_unshared", "muon")]["sent_MiB"] < 0.001
    # DDP: each process broadcasts the half it orthogonalized; FSDP: its shard of every matrix (the all-gather)
    # and half of the half it owns (the scatter); gloo's headers add a little
    assert matrices_mib / 2 <= rows[("ddp", "muon")]["sent_MiB"] < 1.1 * matrices_mib / 2
    assert 0.75 * matrices_mib <= rows[("fsdp", "muon")]["sent_MiB"] < 1.1 * 0.75 * matrices_mib
