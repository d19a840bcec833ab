"""The model: nanoGPT's names and conventions, its implementations agreeing, and generation."""
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from tritongpt.checkpoint import Checkpoint, CheckpointError, build_model, clean_state_dict, load_weights_into
from model import GPT, GPTConfig

TINY = GPTConfig(block_size=32, vocab_size=71, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)


def tiny_model(impl="sdpa", seed=0, **overrides):
    torch.manual_seed(seed)
    config = GPTConfig(**{**TINY.__dict__, **overrides})
    return GPT(config, attn_impl=impl, ln_impl="torch")


def nanogpt_parameter_names(n_layer: int, bias: bool) -> set[str]:
    """The state-dict keys of nanoGPT's model.py, spelled out independently of ours."""
    names = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "lm_head.weight"}
    layer = ["ln_1.weight", "attn.c_attn.weight", "attn.c_proj.weight", "ln_2.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]
    if bias:
        names.add("transformer.ln_f.bias")
        layer += ["ln_1.bias", "attn.c_attn.bias", "attn.c_proj.bias", "ln_2.bias", "mlp.c_fc.bias", "mlp.c_proj.bias"]
    return names | {f"transformer.h.{i}.{name}" for i in range(n_layer) for name in layer}


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_names_and_tying_match_nanogpt(bias):
    model = tiny_model(bias=bias)
    assert set(model.state_dict()) == nanogpt_parameter_names(TINY.n_layer, bias)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_loss_at_init_is_about_log_vocab():
    model = tiny_model()
    x = torch.randint(0, TINY.vocab_size, (8, TINY.block_size))
    y = torch.randint(0, TINY.vocab_size, (8, TINY.block_size))
    _, loss = model(x, y)
    assert abs(loss.item() - math.log(TINY.vocab_size)) < 0.1


def test_forward_conventions():
    model = tiny_model()
    x = torch.randint(0, TINY.vocab_size, (3, 10))
    logits, loss = model(x)
    assert logits.shape == (3, 1, TINY.vocab_size) and loss is None
    targets = x.clone()
    targets[:, :5] = -1  # ignored positions
    full_logits, loss = model(x, targets)
    assert full_logits.shape == (3, 10, TINY.vocab_size)
    expected = torch.nn.functional.cross_entropy(full_logits[:, 5:].reshape(-1, TINY.vocab_size), x[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits[:, 0], full_logits[:, -1])
    with pytest.raises(ValueError, match="block_size is 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_tiny_model_overfits_one_batch():
    model = tiny_model()
    x = torch.randint(0, TINY.vocab_size, (4, 16))
    y = torch.roll(x, -1, dims=1)
    optimizer = model.configure_optimizers(0.0, 3e-3, (0.9, 0.99), "cpu")
    for _ in range(150):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


@pytest.mark.parametrize("T", [1, 7, 32])
def test_eager_and_sdpa_agree_forward_and_backward(T):
    x = torch.randint(0, TINY.vocab_size, (2, T))
    results = {}
    for impl in ("eager", "sdpa"):
        model = tiny_model(impl).double()
        logits, loss = model(x, x)
        loss.backward()
        results[impl] = (logits, {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(results["eager"][0], results["sdpa"][0])
    for name, grad in results["eager"][1].items():
        torch.testing.assert_close(grad, results["sdpa"][1][name], msg=name)


def test_optimizer_groups_decay_only_matrices():
    model = tiny_model()
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_crop_block_size():
    model = tiny_model()
    model.crop_block_size(8)
    assert model.config.block_size == 8 and model.transformer.wpe.weight.shape == (8, TINY.n_embd)
    model(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="crop block_size down"):
        model.crop_block_size(16)


def test_mfu_is_none_without_a_known_peak():
    model = tiny_model()
    assert model.estimate_mfu(4, 0.1, None) is None
    mfu = model.estimate_mfu(4, 1.0, 1e12)
    assert mfu == pytest.approx(model.flops_per_token() * TINY.block_size * 4 / 1e12)


def test_mfu_is_per_gpu_under_data_parallelism():
    """train.py's call: a process's own micro-batches over one GPU's peak. With 8 processes sharing a global
    batch of 8 x 5 micro-batches, each runs 5; counting all 40 against one GPU's peak would be 8x too high."""
    from tritongpt.metrics import mfu_per_gpu

    model = tiny_model()
    flops_per_sequence = model.flops_per_token() * TINY.block_size
    per_gpu = mfu_per_gpu(flops_per_sequence, sequences_per_rank=12 * 5, dt=0.5, peak_flops=1e12)
    assert per_gpu == pytest.approx(model.estimate_mfu(12 * 5, 0.5, 1e12))
    assert per_gpu == pytest.approx(flops_per_sequence * 12 * 5 / 0.5 / 1e12)
    assert mfu_per_gpu(flops_per_sequence, 60, 0.5, None) is None
    # tensor or pipeline parallelism: 4 GPUs share each sequence's work
    assert mfu_per_gpu(flops_per_sequence, 60, 0.5, 1e12, model_parallel=4) == pytest.approx(per_gpu / 4)


def test_invalid_impl_names():
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        tiny_model("flash")
    with pytest.raises(ValueError, match="ln_impl must be one of"):
        tiny_model().set_impl("sdpa", "fused")


def test_triton_without_gpu_or_interpreter_is_a_clear_error():
    """On a machine without a GPU (here: CUDA_VISIBLE_DEVICES empty) and without the interpreter."""
    code = (
        "import torch; from model import GPT, GPTConfig\n"
        "m = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=32), attn_impl='triton')\n"
        "m(torch.zeros(1, 4, dtype=torch.long))\n"
    )
    env = {**{k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0
    assert "attn_impl='triton' needs a CUDA GPU" in out.stderr and "attn_impl='sdpa'" in out.stderr


def test_checkpoint_round_trip_strips_compile_prefix_and_mask_buffers():
    model = tiny_model()
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    state["_orig_mod.transformer.h.0.attn.bias"] = torch.ones(1, 1, 32, 32).tril()  # nanoGPT without flash
    checkpoint = {"model": state, "model_args": {**TINY.__dict__, "unknown_future_key": 1}, "iter_num": 0}
    loaded = build_model(Checkpoint("ckpt.pt", False, checkpoint), attn_impl="eager", ln_impl="torch")
    x = torch.randint(0, TINY.vocab_size, (2, 9))
    torch.testing.assert_close(loaded(x)[0], model(x)[0])
    assert set(clean_state_dict(state)) == set(model.state_dict())
    with pytest.raises(CheckpointError, match="ckpt.pt has no 'model' entry"):
        load_weights_into(Checkpoint("ckpt.pt", False, {"model_args": TINY.__dict__}), model)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("prompt_len,new_tokens", [(1, 10), (5, 60), (32, 5)])
def test_kv_cache_greedy_matches_no_cache(impl, prompt_len, new_tokens):
    """Token-identical, including past block_size (32) where the window slides."""
    model = tiny_model(impl).eval()
    prompt = torch.randint(0, TINY.vocab_size, (3, prompt_len))
    with_cache = model.generate(prompt, new_tokens, temperature=0, use_cache=True)
    without = model.generate(prompt, new_tokens, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without)
    assert with_cache.shape == (3, prompt_len + new_tokens)


def test_checkpoint_keeps_gpt2_tanh_gelu():
    from model import gelu_approximate, set_gelu_approximate

    model = tiny_model()
    set_gelu_approximate(model, "tanh")
    checkpoint = {"model": model.state_dict(), "model_args": dict(TINY.__dict__), "gelu_approximate": "tanh"}
    assert gelu_approximate(build_model(Checkpoint("ckpt.pt", False, checkpoint))) == "tanh"
    del checkpoint["gelu_approximate"]  # nanoGPT's checkpoints: exact GELU
    assert gelu_approximate(build_model(Checkpoint("ckpt.pt", False, checkpoint))) == "none"


def test_kv_cache_refill_conditions_on_the_kept_window(monkeypatch):
    """With refill=N, once the window is full the cache restarts from the last N tokens and grows again:
    each step's logits are a no-cache forward over exactly that window."""
    from tritongpt import generate

    seen_logits = []
    real_sampler = generate.sample_next_token
    monkeypatch.setattr(generate, "sample_next_token", lambda logits, *a: seen_logits.append(logits) or real_sampler(logits, *a))
    model = tiny_model().eval()
    prompt = torch.randint(0, TINY.vocab_size, (2, 30))
    out = model.generate(prompt, 20, temperature=0, refill=8)
    for step, length in enumerate(range(30, 50)):
        # up to length 32 the window is the whole sequence; at 33 it restarts from tokens 25.. and grows
        start = 0 if length <= TINY.block_size else 25
        expected = model(out[:, start:length])[0][:, -1]
        torch.testing.assert_close(seen_logits[step], expected, atol=1e-5, rtol=1e-5, msg=f"length {length}")
    with pytest.raises(ValueError, match="refill must be between 1 and block_size - 1"):
        list(model.generate_stream(prompt, 1, refill=32))
