"""tritongpt/run.py called directly: the model a run starts from, the layout's checks, and one training step
for a model in its layout, against the pieces it is made of (GPT, checkpoint, loop.train_step)."""
import copy

import pytest
import torch

from model import GPT, GPTConfig
from tritongpt import checkpoint as ckpt
from tritongpt import loop, optim, run
from tritongpt.configurator import UserError, script_config
from tritongpt.parallelism import LayoutError, plan_layout

TINY_KEYS = dict(block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True, attn_impl="eager",
                 ln_impl="torch", ce_impl="torch", compile=False, device="cpu", dtype="float32")


def train_config(out_dir, **keys) -> dict:
    """train.py's own defaults with the given keys, as its configurator makes them."""
    values = {**TINY_KEYS, "out_dir": str(out_dir), **keys}
    return script_config("train.py", [f"--{key}={value}" for key, value in values.items()])


def save_a_checkpoint(out_dir, config: dict, iter_num: int, best: float, evals_since_best: int) -> GPT:
    model = GPT(GPTConfig.from_dict({**config, "vocab_size": 50}))
    opt = optim.optimizer_for(model, config, "cpu")
    state = ckpt.train_state(model, iter_num, best, config, {}, {}, evals_since_best)
    ckpt.save(out_dir, False, model, opt, state, sharded=False, master=True)
    return model


def test_scratch_takes_the_datas_vocabulary_or_gpt2s_padded_one(tmp_path):
    config = train_config(tmp_path)
    assert run.start_model(config, set(), 65, restarted=False).model.config.vocab_size == 65
    start = run.start_model(config, set(), None, restarted=False)
    assert start.model.config.vocab_size == 50304
    assert (start.iter_num, start.best_val_loss, start.checkpoint, start.init_from) == (0, float("inf"), None, "scratch")


def test_resume_keeps_the_checkpoints_architecture_and_where_it_was(tmp_path):
    saved = save_a_checkpoint(tmp_path, train_config(tmp_path), iter_num=7, best=2.5, evals_since_best=1)
    # a resumed run's defaults say n_layer=12; the checkpoint's 2 layers win, and its config records that
    config = train_config(tmp_path, init_from="resume", n_layer=12)
    start = run.start_model(config, {"init_from"}, None, restarted=False)
    assert start.model.config.n_layer == 2 and start.config["n_layer"] == 2
    assert (start.iter_num, start.best_val_loss, start.evals_since_best) == (7, 2.5, 1)
    # the weights wait for the layout: they are loaded into the placed (perhaps sharded) model
    assert start.checkpoint is not None
    ckpt.load_weights_into(start.checkpoint, start.model, None, None)
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(start.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def test_a_resumed_model_keeps_its_block_size(tmp_path):
    save_a_checkpoint(tmp_path, train_config(tmp_path), iter_num=1, best=3.0, evals_since_best=0)
    with pytest.raises(UserError, match="block_size=8 is smaller than the 16 of .*resume with block_size=16"):
        run.start_model(train_config(tmp_path, init_from="resume", block_size=8), set(), None, restarted=False)
    with pytest.raises(UserError, match="block_size=32 is larger than the model's 16"):
        run.start_model(train_config(tmp_path, init_from="resume", block_size=32), set(), None, restarted=False)


def test_a_given_architecture_key_that_differs_from_the_checkpoint_is_an_error(tmp_path):
    save_a_checkpoint(tmp_path, train_config(tmp_path), iter_num=3, best=3.0, evals_since_best=0)
    config = train_config(tmp_path, init_from="resume", n_layer=4)
    with pytest.raises(ValueError, match="n_layer"):
        run.start_model(config, {"init_from", "n_layer"}, None, restarted=False)


def test_restarted_workers_resume_when_there_is_a_checkpoint_and_start_afresh_when_not(tmp_path):
    config = train_config(tmp_path)
    assert run.start_model(config, set(), None, restarted=True).init_from == "scratch"
    save_a_checkpoint(tmp_path, config, iter_num=5, best=3.0, evals_since_best=0)
    start = run.start_model(config, set(), None, restarted=True)
    assert (start.init_from, start.iter_num) == ("resume", 5)


def test_check_layout_gives_the_loss_implementation_each_layout_can_run(tmp_path):
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32))
    one = plan_layout(1, 0, 1)
    tensor = plan_layout(2, 0, 2)
    assert run.check_layout(model, train_config(tmp_path, ce_impl="triton"), one, 1, "float32", "cpu") == "triton"
    assert run.check_layout(model, train_config(tmp_path, ce_impl="auto"), tensor, 1, "float32", "cpu") == "torch"
    with pytest.raises(UserError, match="ce_impl='triton' needs the whole lm_head"):
        run.check_layout(model, train_config(tmp_path, ce_impl="triton"), tensor, 1, "float32", "cpu")
    with pytest.raises(LayoutError, match="n_head=2 must be divisible"):
        run.check_layout(model, train_config(tmp_path), plan_layout(4, 0, 4), 1, "float32", "cpu")


def test_one_process_step_is_the_loops_step_on_the_plain_model(tmp_path):
    config = train_config(tmp_path, grad_clip=1.0)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_dict({**config, "vocab_size": 50}), "eager", "torch")
    twin = copy.deepcopy(model)
    model, stages = run.place(model, plan_layout(1, 0, 1), config, torch.device("cpu"))
    assert stages == [model]
    placed = run.parallelize(model, stages, plan_layout(1, 0, 1), config, "float32", False, 2, torch.device("cpu"),
                             0, False, print)
    assert placed.model is model and placed.raw_model is model and placed.pipe is None and not placed.sharded
    generator = torch.Generator().manual_seed(1)
    batches = [tuple(torch.randint(0, 50, (2, 2, 16), generator=generator)) for _ in range(2)]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ours_opt, twin_opt = optim.optimizer_for(model, config, "cpu"), optim.optimizer_for(twin, config, "cpu")
    ours = placed.train_step(ours_opt, scaler, batches.__getitem__, 2, 1.0, torch.autocast("cpu", enabled=False))
    theirs = loop.train_step(twin, twin_opt, scaler, batches.__getitem__, 2, 1.0,
                             torch.autocast("cpu", enabled=False), None)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
