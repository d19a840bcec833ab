"""checkpoint.py: loading never runs code, broken files are clear errors, and the checkpoints of nanoGPT and of
earlier versions of this project still load."""
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tritongpt import checkpoint as ckpt
from conftest import REPO
from model import GPT, GPTConfig

FIXTURES = Path(__file__).parent / "fixtures"
TINY = GPTConfig(block_size=16, vocab_size=65, n_layer=1, n_head=2, n_embd=16, dropout=0.0, bias=False)


class CreatesAFile:
    """Unpickling this calls open(path, "w"): any code could run in its place."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def nanogpt_checkpoint(model: GPT) -> dict:
    """What nanoGPT's train.py saves: a compiled model's state dict, AdamW's state, the config's plain values,
    and best_val_loss as a tensor (its estimate_loss returns tensors)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    optimizer.step()
    model_args = {k: getattr(model.config, k) for k in ckpt.MODEL_ARG_KEYS}
    return {"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, "optimizer": optimizer.state_dict(),
            "model_args": model_args, "iter_num": 250, "best_val_loss": torch.tensor(1.4697),
            "config": {"dataset": "shakespeare_char", "batch_size": 64, "compile": True}}


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "created_by_unpickling"
    torch.save({"model": CreatesAFile(marker), "model_args": {}, "iter_num": 0}, tmp_path / "ckpt.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"refusing to load .*ckpt\.pt.*could run code"):
        ckpt.load_file(tmp_path / "ckpt.pt")
    assert not marker.exists()
    # the same through the programs a user runs on it
    out = subprocess.run([sys.executable, str(REPO / "sample.py"), "--device=cpu", f"--out_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode != 0 and "refusing to load" in out.stderr and "Traceback" not in out.stderr
    assert not marker.exists()


def test_sharded_metadata_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "created_by_unpickling"
    directory = tmp_path / ckpt.SHARDED_DIR
    directory.mkdir()
    (directory / ".metadata").write_bytes(pickle.dumps(CreatesAFile(marker)))
    torch.save({"model_args": {}, "iter_num": 0}, directory / ckpt.TRAIN_STATE)
    with pytest.raises(ckpt.CheckpointError, match=r"refusing to load .*\.metadata.*Unsupported global: .*open"):
        ckpt.find(tmp_path, latest=True)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", *[f"garbage{seed}" for seed in range(8)]])
def test_a_broken_checkpoint_names_the_file_and_what_to_do(tmp_path, damage):
    path = tmp_path / "ckpt.pt"
    torch.manual_seed(0)
    torch.save(nanogpt_checkpoint(GPT(TINY)), path)
    data = path.read_bytes()
    if damage.startswith("garbage"):  # random bytes break the unpickler in many different ways
        data = random.Random(damage).randbytes(1000)
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b""}.get(damage, data))
    with pytest.raises(ckpt.CheckpointError, match=r"ckpt\.pt is truncated or corrupt .*; delete it"):
        ckpt.load_file(path)


def test_not_a_checkpoint(tmp_path):
    torch.save([1, 2, 3], tmp_path / "ckpt.pt")
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint: it holds a list"):
        ckpt.load_file(tmp_path / "ckpt.pt")
    torch.save({"model": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(ckpt.CheckpointError, match="lacks model_args, iter_num"):
        ckpt.find(tmp_path, latest=True)


def test_nanogpt_checkpoint_loads_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    torch.save(nanogpt_checkpoint(model), tmp_path / "ckpt.pt")
    found = ckpt.find(tmp_path, latest=True)
    assert found.iter_num == 250 and found.state["best_val_loss"] == pytest.approx(1.4697)
    loaded = ckpt.build_model(found).eval()
    x = torch.randint(0, TINY.vocab_size, (2, 16))
    torch.testing.assert_close(loaded(x, x)[0], model(x, x)[0], atol=0, rtol=0)
    optimizer = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    ckpt.load_weights_into(found, loaded, optimizer)
    assert all(state["step"] == 1 for state in optimizer.state.values())


def test_a_checkpoint_of_the_previous_version_loads():
    """tests/fixtures/tritongpt_d68e3b2_ckpt.pt: written by train.py at commit d68e3b2 (1 layer, 16 wide,
    dropout 0.1, 3 iterations on shakespeare_char), before checkpoints were loaded with weights_only=True."""
    found = ckpt.read_checkpoint(FIXTURES / "tritongpt_d68e3b2_ckpt.pt", sharded=False)
    assert found.iter_num == 3 and found.state["rng"]["world_size"] == 1
    model = ckpt.build_model(found, "sdpa", "torch")
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
    ckpt.load_weights_into(found, model, optimizer)
    assert ckpt.restore_rng_states(found.state["rng"], torch.device("cpu"), rank=0, world_size=1)
    logits, loss = model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))
    assert torch.isfinite(loss) and 3.5 < loss.item() < 5.5  # an almost untrained 65-character model


def test_our_checkpoints_hold_only_plain_values(tmp_path):
    """What train.py saves loads with weights_only=True: written and read back here, RNG states included."""
    torch.manual_seed(0)
    model = GPT(TINY)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    state = ckpt.train_state(model, 7, 1.5, {"dataset": "x"}, scaler.state_dict(),
                             ckpt.gather_rng_states(torch.device("cpu"), 1), evals_since_best=2)
    ckpt.save(tmp_path, False, model, optimizer, state, sharded=False, master=True)
    found = ckpt.find(tmp_path, latest=True)
    assert found.iter_num == 7 and found.state["evals_since_best"] == 2 and found.state["scaler"]["scale"] == 65536.0


def test_find_prefers_the_newer_of_best_and_latest(tmp_path):
    torch.manual_seed(0)
    model = GPT(TINY)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    for latest, iter_num in ((False, 10), (True, 20)):
        state = ckpt.train_state(model, iter_num, 1.0, {}, {}, ckpt.gather_rng_states(torch.device("cpu"), 1))
        ckpt.save(tmp_path, latest, model, optimizer, state, sharded=False, master=True)
    assert ckpt.find(tmp_path, latest=True).path.name == ckpt.LATEST_FILE
    assert ckpt.find(tmp_path, latest=False).path.name == ckpt.CKPT_FILE  # sampling takes the best
    ckpt.remove_latest(tmp_path)
    assert ckpt.find(tmp_path, latest=True).path.name == ckpt.CKPT_FILE
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in .*train one first"):
        ckpt.require(tmp_path / "elsewhere", latest=True)


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "nested (before pipeline parallelism)"])
def test_sharded_checkpoints_load_in_either_optimizer_form(tmp_path, flat):
    """Sharded checkpoints key the optimizer's param groups by parameter name (flat); those written before
    pipeline parallelism keyed them by group number (nested). Both load into a plain model and AdamW."""
    from tritongpt.optim import build_optimizer

    def make_optimizer(model):
        return build_optimizer(model, "adamw", 1e-3, 0.1, (0.9, 0.95), "cpu")

    torch.manual_seed(0)
    model = GPT(TINY)
    optimizer = make_optimizer(model)
    model(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))[1].backward()
    optimizer.step()
    path = save_sharded_in_one_process(tmp_path, model, optimizer, 1, flat)
    assert ckpt.optimizer_state_is_flat(path) == flat

    loaded = ckpt.build_model(ckpt.read_checkpoint(path, sharded=True), "sdpa", "torch", load_weights=False)
    loaded_optimizer = make_optimizer(loaded)
    ckpt.load_weights_into(ckpt.read_checkpoint(path, sharded=True), loaded, loaded_optimizer)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    expected, actual = optimizer.state_dict(), loaded_optimizer.state_dict()
    assert actual["param_groups"] == expected["param_groups"]
    for index, state in expected["state"].items():
        torch.testing.assert_close(actual["state"][index]["exp_avg_sq"], state["exp_avg_sq"], rtol=0, atol=0)


def save_sharded_in_one_process(out_dir, model, optimizer, iter_num, flat=True):
    """A ckpt_dcp/ as a sharded run writes it (DCP also runs in one process, with a warning)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer,
                                              options=StateDictOptions(flatten_optimizer_state_dict=flat))
    path = out_dir / ckpt.SHARDED_DIR
    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=path)
    torch.save(ckpt.train_state(model, iter_num, 2.0, {}, {}, {}), path / ckpt.TRAIN_STATE)
    return path


@pytest.mark.parametrize("plain_iter, sharded_iter", [(6, 9), (9, 6)])
def test_find_takes_the_newer_of_a_plain_and_a_sharded_checkpoint(tmp_path, plain_iter, sharded_iter):
    """A one-process run's ckpt.pt, resumed under FSDP, tensor or pipeline parallelism, gets a newer
    ckpt_dcp/ beside it (and the other way round): resuming and sampling take the newer."""
    model = GPT(TINY)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    state = ckpt.train_state(model, plain_iter, 1.0, {}, {}, ckpt.gather_rng_states(torch.device("cpu"), 1))
    ckpt.save(tmp_path, False, model, optimizer, state, sharded=False, master=True)
    save_sharded_in_one_process(tmp_path, model, optimizer, sharded_iter)
    for latest in (True, False):
        found = ckpt.find(tmp_path, latest=latest)
        assert found.iter_num == 9 and found.sharded == (sharded_iter == 9)


def crafted_sharded_checkpoint(out_dir, marker, where: str):
    """A ckpt_dcp/ whose .metadata is clean but one entry is a pickle that creates `marker` when loaded with
    weights_only=False (DCP's own reader): an optimizer param group's lr, or a model entry."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.manual_seed(0)
    model = GPT(TINY)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    model_state, optim_state = get_state_dict(model, optimizer, options=ckpt.FLAT)
    if where == "optimizer":
        optim_state[next(key for key in optim_state if key.endswith(".lr"))] = CreatesAFile(marker)
    else:
        model_state["transformer.wte.weight"] = CreatesAFile(marker)
    path = out_dir / ckpt.SHARDED_DIR
    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=path)
    torch.save(ckpt.train_state(model, 5, 2.0, {}, {}, {}), path / ckpt.TRAIN_STATE)
    return model, optimizer


def test_a_sharded_optimizer_entry_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "created_by_unpickling"
    model, optimizer = crafted_sharded_checkpoint(tmp_path, marker, "optimizer")
    found = ckpt.find(tmp_path, latest=True)  # the metadata is clean: DCP's own entries only
    with pytest.raises(ckpt.CheckpointError, match=r"refusing to load .*ckpt_dcp.*could run code"):
        ckpt.load_weights_into(found, model, optimizer)
    assert not marker.exists()


def test_a_sharded_model_entry_that_is_not_a_tensor_is_refused(tmp_path):
    marker = tmp_path / "created_by_unpickling"
    crafted_sharded_checkpoint(tmp_path, marker, "model")
    with pytest.raises(ckpt.CheckpointError, match=r"model entries must be tensors.*transformer\.wte\.weight"):
        ckpt.find(tmp_path, latest=False)
    out = subprocess.run([sys.executable, str(REPO / "sample.py"), "--device=cpu", f"--out_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode != 0 and "model entries must be tensors" in out.stderr and "Traceback" not in out.stderr
    assert not marker.exists()


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_as_it_was(tmp_path, monkeypatch):
    """The new checkpoint goes to a temp name first: a save that fails after writing half of it leaves
    ckpt.pt byte for byte the previous one, and no temp file."""
    torch.manual_seed(0)
    model = GPT(TINY)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    state = ckpt.train_state(model, 1, 2.0, {}, {}, {})
    ckpt.save(tmp_path, False, model, optimizer, state, sharded=False, master=True)
    before = (tmp_path / "ckpt.pt").read_bytes()

    def dies_midway(obj, f):
        f.write(before[: len(before) // 2])
        raise KeyboardInterrupt  # a second Ctrl-C, say

    monkeypatch.setattr(ckpt.torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(tmp_path, False, model, optimizer, {**state, "iter_num": 2}, sharded=False, master=True)
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_weights_that_do_not_fit_model_args_are_a_clear_error(tmp_path):
    torch.manual_seed(0)
    saved = nanogpt_checkpoint(GPT(TINY))
    saved["model_args"]["n_embd"] = 32  # edited by hand, or the weights of another model
    torch.save(saved, tmp_path / "ckpt.pt")
    found = ckpt.find(tmp_path, latest=True)
    with pytest.raises(ckpt.CheckpointError, match=r"ckpt\.pt: its weights do not fit the model its model_args "
                                                   r"describe \(.*size mismatch"):
        ckpt.build_model(found)


def test_non_finite_weights_are_refused_where_they_are_loaded(tmp_path):
    torch.manual_seed(0)
    model = GPT(TINY)
    ckpt.check_finite_weights(model, "ok")
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[3, 4] = float("nan")
    with pytest.raises(ckpt.CheckpointError, match=r"x/ckpt\.pt holds non-finite weights \(transformer\.h\.0\.mlp\."
                                                   r"c_fc\.weight .*resume from an earlier checkpoint or train again"):
        ckpt.check_finite_weights(model, "x/ckpt.pt")


def test_a_resumed_model_keeps_its_architecture():
    """Architecture keys the user set to other values than the checkpoint's cannot apply: refused. Those left
    at their defaults take the model's values, so the saved config agrees with model_args."""
    config = GPTConfig(block_size=16, vocab_size=65, n_layer=1, n_head=2, n_embd=16, bias=False, norm="rmsnorm")
    run = {"n_layer": 12, "n_head": 12, "n_embd": 768, "bias": False, "norm": "layernorm", "dropout": 0.1,
           "learning_rate": 1e-3}
    kept = ckpt.keep_architecture(config, run, given={"dropout", "learning_rate", "bias"}, source="out/ckpt.pt")
    assert kept == {**run, "n_layer": 1, "n_head": 2, "n_embd": 16, "norm": "rmsnorm"}
    with pytest.raises(ValueError, match=r"the model from out/ckpt\.pt keeps its architecture, so n_layer=4 \(it has "
                                         r"1\), norm='layernorm' \(it has 'rmsnorm'\) cannot apply; drop the setting"):
        ckpt.keep_architecture(config, {**run, "n_layer": 4}, given={"n_layer", "norm"}, source="out/ckpt.pt")
