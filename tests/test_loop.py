"""loop.py, distributed.py, metrics.py and the schedule and batches (optim.get_lr, data.Batches) called directly:
one optimizer step, evaluation, early stopping, signals, and what a run reports."""
import collections
import math
import os
import signal

import pytest
import torch

from tritongpt import metrics
from tritongpt import data
from tritongpt import distributed
from tritongpt import loop
from tritongpt import optim
from model import GPT, GPTConfig

TINY = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
SCHEDULE = dict(learning_rate=6e-4, warmup_iters=10, lr_decay_iters=100, min_lr=6e-5)


def reference_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """nanoGPT's schedule, written out independently: linear warmup reaching learning_rate after warmup_iters
    steps (step 0 already gets 1/(warmup+1) of it), half a cosine down to min_lr, then min_lr for good."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + (learning_rate - min_lr) * (1 + math.cos(math.pi * progress)) / 2


@pytest.mark.parametrize("it", [0, 1, 9, 10, 11, 55, 99, 100, 101, 10_000])
def test_lr_schedule_at_its_boundaries(it):
    assert optim.get_lr(it, **SCHEDULE) == pytest.approx(reference_lr(it, **SCHEDULE), rel=1e-12)


def test_lr_schedule_edges():
    assert optim.get_lr(0, **SCHEDULE) > 0  # never a wasted step at lr 0
    assert optim.get_lr(10, **SCHEDULE) == pytest.approx(6e-4)  # the peak, right after warmup
    assert optim.get_lr(100, **SCHEDULE) == pytest.approx(6e-5) == optim.get_lr(5000, **SCHEDULE)
    assert optim.get_lr(3, **SCHEDULE, decay_lr=False) == 6e-4
    no_decay_window = dict(SCHEDULE, warmup_iters=100)  # warmup up to lr_decay_iters: no division by zero
    assert optim.get_lr(100, **no_decay_window) == pytest.approx(6e-4)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(TINY, "sdpa", "torch")


def test_accumulated_micro_steps_equal_one_big_batch():
    """4 micro-batches of 2 rows, accumulated, give the gradient (the update) of one batch of 8 (fp32)."""
    data = torch.randint(0, TINY.vocab_size, (8, TINY.block_size + 1), generator=torch.Generator().manual_seed(1))
    x, y = data[:, :-1], data[:, 1:]
    results = []
    for micro_batches in (1, 4):
        model = tiny_model()
        # SGD with lr 1 and no clipping: the update is the gradient itself, so a gradient off by any factor
        # (a loss not divided by the micro-steps) shows; Adam's normalized step would nearly hide it
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        rows = 8 // micro_batches
        loss = loop.train_step(model, optimizer, scaler, lambda i: (x[i * rows:(i + 1) * rows], y[i * rows:(i + 1) * rows]),
                                   micro_batches, 0.0, torch.autocast("cpu", enabled=False))
        results.append((loss.item(), [p.detach().clone() for p in model.parameters()]))
    (loss_one, params_one), (loss_four, params_four) = results
    assert loss_four == pytest.approx(loss_one, rel=1e-6)
    for a, b in zip(params_one, params_four):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_train_step_clips_and_syncs_only_on_the_last_micro_step():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    syncs = []
    x = torch.randint(0, TINY.vocab_size, (2, TINY.block_size))
    loop.train_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), lambda i: (x, x), 3, 0.01,
                        torch.autocast("cpu", enabled=False), syncs.append)
    assert syncs == [False, False, True]
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert update.norm().item() == pytest.approx(0.01, rel=1e-4)  # SGD lr 1: the step is the clipped gradient
    assert all(p.grad is None for p in model.parameters())


def test_estimate_loss_is_the_mean_over_the_same_batches():
    model = tiny_model()
    calls = []

    def get_batch(split, k):
        calls.append((split, k))
        g = torch.Generator().manual_seed(k + (100 if split == "val" else 0))
        return torch.randint(0, TINY.vocab_size, (2, TINY.block_size), generator=g), torch.randint(
            0, TINY.vocab_size, (2, TINY.block_size), generator=g)

    losses = loop.estimate_loss(model, get_batch, 3, torch.autocast("cpu", enabled=False))
    assert calls == [("train", 0), ("train", 1), ("train", 2), ("val", 0), ("val", 1), ("val", 2)]
    with torch.no_grad():
        expected = sum(model(*get_batch("val", k))[1].item() for k in range(3)) / 3
    assert losses["val"] == pytest.approx(expected, rel=1e-6)
    assert model.training  # back in training mode


def test_batches_are_a_function_of_seed_step_and_index(tmp_path):
    from tritongpt.data import TokenSplit, write_tokens

    write_tokens(tmp_path / "train.bin", torch.arange(1000) % 50)
    write_tokens(tmp_path / "val.bin", torch.arange(500) % 50)
    splits = {s: TokenSplit(tmp_path, s) for s in ("train", "val")}
    batches = data.Batches(splits, 4, 8, torch.device("cpu"), seed=1337)
    assert torch.equal(batches.train(5, 2)[0], batches.train(5, 2)[0])
    assert not torch.equal(batches.train(5, 2)[0], batches.train(5, 3)[0])
    assert not torch.equal(batches.train(5, 2)[0], data.Batches(splits, 4, 8, torch.device("cpu"), 1).train(5, 2)[0])
    x, y = batches.eval("val", 0)
    assert torch.equal(y[:, :-1], x[:, 1:])


def test_early_stopping_counts_evals_without_improvement():
    early = loop.EarlyStopping(patience=2)
    assert [early.update(v) for v in (3.0, 2.5, 2.6, 2.5)] == [True, True, False, False]
    assert early.should_stop and early.best == 2.5
    assert not loop.EarlyStopping(patience=0, evals_since_best=99).should_stop  # 0: off
    resumed = loop.EarlyStopping(patience=2, best=2.5, evals_since_best=1)
    assert resumed.update(2.4) and not resumed.should_stop
    with pytest.raises(ValueError, match="early_stopping_patience must be >= 0"):
        loop.EarlyStopping(patience=-1)


def test_stop_signal_asks_to_stop_and_names_the_exit_code(capsys):
    stop = distributed.StopSignal().install()
    try:
        assert stop.received is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM and stop.exit_code == 143
        assert "SIGTERM received: stopping after this step" in capsys.readouterr().err
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM (torchrun forwarding one) changes nothing
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # but a Ctrl-C after a stop request aborts
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert distributed.agree_to_stop(True, torch.device("cpu"), 1)


def test_processes_and_accumulation():
    alone = distributed.setup_distributed("cpu", "nccl", env={})
    assert (alone.rank, alone.world_size, alone.master, alone.enabled) == (0, 1, True, False)
    assert distributed.per_rank_accumulation(40, 8) == 5
    with pytest.raises(ValueError, match="not divisible by the 3 processes; pick a multiple of 3"):
        distributed.per_rank_accumulation(40, 3)
    model = tiny_model()
    assert loop.gradient_sync_switch(model, model) is None


def test_step_timer_leaves_out_the_warm_up_steps():
    timer = metrics.StepTimer(warmup=2)
    timer.update(60.0, 0.01)  # compiling
    timer.update(5.0, 0.2)
    assert timer.eta(100) == "measuring" and timer.mfu is None
    timer.update(0.5, 0.4)
    assert timer.eta(100) == "0:00:50" and timer.mfu == 0.4
    assert metrics.format_eta(3 * 3600 + 62) == "3:01:02"


def test_loss_plot_is_written_atomically(tmp_path):
    pytest.importorskip("matplotlib")
    records = [{"iter": 0, "train_loss": 4.0, "val_loss": 4.1}, {"iter": 0, "loss": 4.2}, {"iter": 1, "loss": 3.9},
               {"iter": 1, "loss": 3.8}, {"iter": 2, "train_loss": 3.5, "val_loss": 3.6}]  # iter 1 twice: a resume
    for record in records:
        metrics.log_metrics(tmp_path, record)
    path = metrics.plot_losses(tmp_path, tokens_per_iter=1000)
    assert path == tmp_path / "loss.png" and path.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]


def test_a_torn_last_line_is_skipped_said_and_never_glued_to_the_next(tmp_path, capsys):
    """kill -9 (or a full disk) in the middle of a write leaves half a line: reading skips it and says so,
    and the next run's first record still gets a line of its own."""
    metrics.log_metrics(tmp_path, {"iter": 0, "train_loss": 4.0, "val_loss": 4.1})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iter": 1, "loss": 3.')
    assert metrics.read_metrics(tmp_path) == [{"iter": 0, "train_loss": 4.0, "val_loss": 4.1}]
    assert "skipped 1 torn line(s)" in capsys.readouterr().err
    metrics.log_metrics(tmp_path, {"iter": 1, "loss": 3.5})
    assert metrics.read_metrics(tmp_path)[-1] == {"iter": 1, "loss": 3.5}
    assert (tmp_path / "metrics.jsonl").read_text().splitlines()[-1] == '{"iter": 1, "loss": 3.5}'


def test_a_plot_that_fails_is_a_warning_not_a_crash(tmp_path, monkeypatch, capsys):
    matplotlib = pytest.importorskip("matplotlib.figure")

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(matplotlib.Figure, "savefig", broken)
    metrics.log_metrics(tmp_path, {"iter": 0, "train_loss": 4.0, "val_loss": 4.1})
    assert metrics.plot_losses(tmp_path, tokens_per_iter=1000) is None
    err = capsys.readouterr().err
    assert "warning: could not draw" in err and "no fonts" in err and "training goes on" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


# -----------------------------------------------------------------------------
# Kernel launches per training step, against a plain nanoGPT-style model and loop

# aten ops that launch no kernel: views, allocations and bookkeeping
NO_KERNEL = {"aten::view", "aten::as_strided", "aten::transpose", "aten::t", "aten::permute", "aten::select",
             "aten::slice", "aten::narrow", "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::reshape",
             "aten::_reshape_alias", "aten::_unsafe_view", "aten::split", "aten::split_with_sizes", "aten::unbind",
             "aten::chunk", "aten::detach", "aten::alias", "aten::empty", "aten::empty_like", "aten::empty_strided",
             "aten::resize_", "aten::lift_fresh", "aten::result_type", "aten::to", "aten::_to_copy_meta",
             "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense", "aten::contiguous", "aten::numel",
             "aten::size", "aten::stride", "aten::set_", "aten::_has_compatible_shallow_copy_type",
             "aten::dropout"}  # at p=0, as here, dropout returns its input (and a plain model has none)


def kernel_launches(step, repeats=2) -> collections.Counter:
    """The aten ops of one call of step() that launch a kernel (leaf ops but views and allocations)."""
    step()  # warm-up: lazy state (optimizer moments) is made once
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step()
    counts = collections.Counter(e.name for e in prof.events()
                                 if e.name.startswith("aten::") and not e.cpu_children and e.name not in NO_KERNEL)
    return collections.Counter({name: n // repeats for name, n in counts.items()})


class PlainBlock(torch.nn.Module):
    """GPT-2's block as nanoGPT writes it: q, k, v split from one projection, SDPA, exact GELU."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(width, bias=False), torch.nn.LayerNorm(width, bias=False)
        self.c_attn, self.c_proj = torch.nn.Linear(width, 3 * width, bias=False), torch.nn.Linear(width, width, bias=False)
        self.c_fc, self.mlp_proj = torch.nn.Linear(width, 4 * width, bias=False), torch.nn.Linear(4 * width, width, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for t in self.c_attn(self.ln_1(x)).split(C, dim=2))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(torch.nn.functional.gelu(self.c_fc(self.ln_2(x))))


class PlainGPT(torch.nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.wte = torch.nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = torch.nn.Embedding(config.block_size, config.n_embd)
        self.blocks = torch.nn.ModuleList(PlainBlock(config.n_embd, config.n_head) for _ in range(config.n_layer))
        self.ln_f = torch.nn.LayerNorm(config.n_embd, bias=False)
        self.lm_head = torch.nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def test_a_training_step_launches_no_more_kernels_than_a_plain_loop():
    """train_step on our GPT (GPT-2's recipe, PyTorch's implementations) against nanoGPT's loop over a plain
    GPT-2: forward, loss / micro-steps, backward, clip, AdamW, zero_grad. Ours may add only the launches of
    its exact mean loss (a stack's cat and a sum's fill); a copy per layer (the gradient of q, k and v
    gathered through a permute, say) shows here."""
    config = GPTConfig(block_size=32, vocab_size=50, n_layer=3, n_head=2, n_embd=32, dropout=0.0, bias=False)
    data = torch.randint(0, config.vocab_size, (2, 4, config.block_size + 1), generator=torch.Generator().manual_seed(0))
    batches = [(d[:, :-1], d[:, 1:]) for d in data]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    no_autocast = torch.autocast("cpu", enabled=False)
    ours = GPT(config, "sdpa", "torch")
    our_optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-3, fused=True)
    plain = PlainGPT(config)
    plain_optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-3, fused=True)

    def our_step():
        loop.train_step(ours, our_optimizer, scaler, lambda i: batches[i], 2, 1.0, no_autocast)

    def plain_step():
        for x, y in batches:
            (plain(x, y) / 2).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        plain_optimizer.step()
        plain_optimizer.zero_grad(set_to_none=True)

    extra = kernel_launches(our_step) - kernel_launches(plain_step)
    assert extra <= collections.Counter({"aten::cat": 1, "aten::fill_": 1}), extra
