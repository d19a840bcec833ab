"""The modern recipe's switches and Muon, each against an independent reference; every combination builds,
trains and reloads; all off is GPT-2 exactly as before."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from tritongpt import checkpoint as ckpt
from tritongpt import optim
from conftest import KERNEL_DEVICE
from tritongpt.generate import KVCache
from model import GPT, SWITCHES, GPTConfig, rotary, rotary_tables

TINY = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False)
MODERN = dict(pos_embedding="rope", norm="rmsnorm", qk_norm=True, activation="relu2", tie_embeddings=False,
              logit_softcap=15.0, zero_init_proj=True)


def tiny(seed=0, impl=("sdpa", "torch"), **switches) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **switches}), *impl)


def batch(seed=1, rows=4, length=16, vocab=50):
    data = torch.randint(0, vocab, (rows, length + 1), generator=torch.Generator().manual_seed(seed))
    return data[:, :-1], data[:, 1:]


def test_all_switches_off_is_the_gpt2_model():
    """Losses and logits of the model of commit a7fc191 (before the switches existed), computed with that
    commit's model.py by the same code as here: dropout on, AdamW, three steps. To the last bit on the CPU
    that computed them; not quite elsewhere: on another CPU of the CI pool (AMD EPYC with AVX-512,
    2026-12-04) the third loss came out one float32 ulp lower (3.9272561 for 3.9272563) and the logits'
    sum 1.5e-6 off (-0.7073132 for -0.7073117, a sum of 100 logits of either sign), the same code at
    commit d7a0a9b included: the matmuls sum in an order that depends on the CPU's vector width."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, dropout=0.1, bias=True),
                "sdpa", "torch")
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(3):
        x = torch.randint(0, 50, (4, 17), generator=g)
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses == pytest.approx([3.899081230163574, 3.923570156097412, 3.9272563457489014], rel=1e-6, abs=0)
    assert model(x[:, :-1])[0].sum().item() == pytest.approx(-0.707311749458313, rel=0, abs=1e-5)
    assert ckpt.model_args_of(model).keys() == set(ckpt.MODEL_ARG_KEYS)  # exactly nanoGPT's model_args


def test_rope_is_the_complex_rotation():
    """Each pair (x[i], x[i + D/2]) as the complex number x[i] + j x[i + D/2], times e^(j p theta_i)."""
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    positions = torch.tensor([0, 1, 2, 5, 100, 1000, 123456])
    base = 10000.0
    theta = base ** (-torch.arange(4, dtype=torch.float64) / 4)
    z = torch.complex(x[..., :4], x[..., 4:]) * torch.polar(torch.ones(7, 4, dtype=torch.float64),
                                                           positions[:, None].double() * theta)
    expected = torch.cat((z.real, z.imag), dim=-1)
    torch.testing.assert_close(rotary(x, *rotary_tables(positions, 8, base)), expected, atol=1e-12, rtol=0)
    # relative positions only: shifting every position leaves q . k unchanged
    q, k = torch.randn(2, 1, 5, 8, dtype=torch.float64), torch.randn(2, 1, 5, 8, dtype=torch.float64)
    p = torch.arange(5)
    here, there = rotary_tables(p, 8, base), rotary_tables(p + 777, 8, base)
    scores = rotary(q, *here) @ rotary(k, *here).transpose(-1, -2)
    shifted = rotary(q, *there) @ rotary(k, *there).transpose(-1, -2)
    torch.testing.assert_close(scores, shifted, atol=1e-9, rtol=0)


def test_rmsnorm_qk_norm_relu2_and_softcap_against_float64_formulas():
    model = tiny(**MODERN).double()
    block = model.transformer.h[0]
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    assert block.ln_1.bias is None
    with torch.no_grad():
        block.ln_1.weight.normal_()
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * block.ln_1.weight
    torch.testing.assert_close(block.ln_1(x), expected, atol=1e-12, rtol=0)
    hidden = block.mlp.c_fc(x)
    torch.testing.assert_close(block.mlp(x), block.mlp.c_proj(torch.where(hidden > 0, hidden * hidden, 0.0)))
    # softcap: the same weights without the cap give raw logits; with it, 15 * tanh(raw / 15), so |logits| < 15
    with torch.no_grad():
        model.lm_head.weight.normal_(std=2.0)
    idx = torch.randint(0, 50, (2, 9))
    capped, _ = model(idx, idx)
    model.config.logit_softcap = 0.0
    raw, _ = model(idx, idx)
    assert raw.abs().max() > 15 and capped.abs().max() < 15
    torch.testing.assert_close(capped, 15.0 * torch.tanh(raw / 15.0))


def test_qk_norm_makes_every_head_vector_unit_rms():
    model = tiny(qk_norm=True)
    with torch.no_grad():  # q and k far from zero, so that the norm's eps (1e-5) is negligible
        for block in model.transformer.h:
            block.attn.c_attn.weight.normal_()
    seen = {}
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen["q"], seen["k"] = q, k
        return real(q, k, v, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        model(torch.randint(0, 50, (2, 8)))
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    for t in (seen["q"], seen["k"]):
        torch.testing.assert_close(t.pow(2).mean(-1), torch.ones(t.shape[:-1]), atol=1e-4, rtol=0)


def test_untied_head_zero_init_and_parameter_names():
    model = tiny(**MODERN)
    names = set(model.state_dict())
    assert "transformer.wpe.weight" not in names and "transformer.ln_f.bias" not in names
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.lm_head.weight.abs().sum() == 0  # uniform predictions at the start: loss = log(vocab)
    assert all(p.abs().sum() == 0 for n, p in model.named_parameters() if n.endswith("c_proj.weight"))
    _, loss = model(*batch())
    assert loss.item() == pytest.approx(torch.log(torch.tensor(50.0)).item(), abs=1e-5)


def test_every_switch_combination_builds_trains_and_reloads(tmp_path):
    values = {"pos_embedding": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"), "qk_norm": (False, True),
              "activation": ("gelu", "relu2"), "tie_embeddings": (True, False), "logit_softcap": (0.0, 10.0),
              "zero_init_proj": (False, True)}
    x, y = batch()
    for combination in itertools.product(*values.values()):
        switches = dict(zip(values, combination))
        model = tiny(n_layer=1, **switches)
        opt = optim.build_optimizer(model, "muon", 3e-3, 0.1, (0.9, 0.95), "cpu")
        losses = []
        for _ in range(2):
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[1] < losses[0], switches
        state = ckpt.train_state(model, 2, 1.0, {}, {}, ckpt.gather_rng_states(torch.device("cpu"), 1))
        ckpt.save(tmp_path, False, model, opt, state, sharded=False, master=True)
        found = ckpt.find(tmp_path, latest=True)
        assert found.state["model_args"] == {**{k: TINY[k] for k in ckpt.MODEL_ARG_KEYS}, "n_layer": 1,
                                             **model.config.switches_on()}
        reloaded = ckpt.build_model(found, "sdpa", "torch")
        torch.testing.assert_close(reloaded(x, y)[0], model(x, y)[0], atol=0, rtol=0, msg=str(switches))


def sliding_window_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The logits of a whole sequence longer than block_size in which every layer's query i attends to the
    positions i - block_size + 1 .. i: what a rolling cache computes, written out with an explicit mask."""
    length, window = idx.size(1), model.config.block_size
    positions = torch.arange(length)
    visible = (positions[None, :] <= positions[:, None]) & (positions[None, :] > positions[:, None] - window)
    x = model.transformer.wte(idx)
    for block in model.transformer.h:
        attn = block.attn
        h = block.ln_1(x)
        q, k, v = attn.c_attn(h).view(*h.shape[:2], 3, -1, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = F.rms_norm(q, (q.size(-1),), eps=1e-5), F.rms_norm(k, (k.size(-1),), eps=1e-5)
        rope = rotary_tables(positions, q.size(-1), model.config.rope_base)
        q, k = rotary(q, *rope), rotary(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        x = x + attn.c_proj(y.transpose(1, 2).reshape(h.shape))
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(model.transformer.ln_f(x))


@pytest.mark.parametrize("n_layer", [1, 2])
def test_rolling_kv_cache_past_block_size(n_layer):
    """roll=True: one token per step past block_size. Every step's logits are sliding-window attention over
    the whole text; with one layer that is exactly rerunning the last block_size tokens (nanoGPT's rule)."""
    model = tiny(pos_embedding="rope", norm="rmsnorm", qk_norm=True, n_layer=n_layer).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # a model with opinions: greedy decoding is a strong check
    prompt = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(3))
    rolled = model.generate(prompt, 60, temperature=0, roll=True)  # 65 tokens, block_size 16
    cache = KVCache(model.config, rolling=True)
    with torch.no_grad():
        model(rolled[:, :16], cache=cache)
        reference = sliding_window_forward(model, rolled)
        for t in range(16, 65):
            step, _ = model(rolled[:, t:t + 1], cache=cache)
            torch.testing.assert_close(step[:, 0], reference[:, t], atol=1e-5, rtol=1e-5)
            if n_layer == 1:
                window, _ = model(rolled[:, t - 15:t + 1])
                torch.testing.assert_close(step, window, atol=1e-5, rtol=1e-5)
    if n_layer == 1:
        assert torch.equal(rolled, model.generate(prompt, 60, temperature=0, use_cache=False))
    with pytest.raises(ValueError, match="refill and roll"):
        model.generate(prompt, 1, refill=8, roll=True)
    with pytest.raises(ValueError, match="needs pos_embedding='rope'"):
        tiny().generate(prompt, 1, roll=True)


@pytest.mark.parametrize("attn_impl,ln_impl", [("triton", "torch"), ("sdpa", "triton"), ("triton", "triton")])
def test_triton_paths_match_pytorch_with_the_modern_switches(attn_impl, ln_impl):
    """RMS mode of the norm kernel, and flash attention after QK-norm and RoPE (interpreter on CPU)."""
    x, y = (t.to(KERNEL_DEVICE) for t in batch(length=13))
    grads = {}
    for impl in (("sdpa", "torch"), (attn_impl, ln_impl)):
        model = tiny(impl=impl, **MODERN).to(KERNEL_DEVICE)
        with torch.no_grad():
            model.lm_head.weight.normal_(std=0.02)  # zero-initialized: no gradient would reach the rest
        _, loss = model(x, y)
        loss.backward()
        grads[impl] = (loss.item(), [p.grad for p in model.parameters()])
    (ref_loss, ref_grads), (loss, ours) = grads.values()
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for a, b in zip(ours, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)


def test_muon_step_is_torchs_own():
    """In bfloat16 our Muon is torch.optim.Muon itself; in float32 the same rule with float32 iterations:
    within bfloat16's error of it, and closer to an exact orthogonalization (SVD)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(32, 48)), torch.nn.Parameter(torch.randn(64, 16))]
    grads = [torch.randn_like(p) for p in params]
    results = {}
    for name in ("torch", "bf16", "fp32"):
        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
        kwargs = dict(lr=0.02, momentum=0.95, weight_decay=0.1, nesterov=True, adjust_lr_fn="match_rms_adamw")
        opt = torch.optim.Muon(copies, **kwargs) if name == "torch" else optim.Muon(
            copies, ns_dtype=torch.bfloat16 if name == "bf16" else torch.float32, **kwargs)
        for _ in range(2):
            for c, g in zip(copies, grads):
                c.grad = g.clone()
            opt.step()
        results[name] = [c.detach() for c in copies]
    for ours, theirs in zip(results["bf16"], results["torch"]):
        assert torch.equal(ours, theirs)
    for ours, theirs, start in zip(results["fp32"], results["torch"], params):
        step_ours, step_theirs = ours - start.detach(), theirs - start.detach()
        assert (step_ours - step_theirs).norm() < 0.05 * step_theirs.norm()


def test_muon_with_adamw_is_one_optimizer_over_disjoint_groups():
    model = tiny(**MODERN)
    opt = optim.build_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.95), "cpu", muon_lr=0.05, muon_momentum=0.9)
    muon_params = {id(p) for g in opt.param_groups if g["muon"] for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon_params}
    assert names == set(optim.block_matrices(model)) and all(".h." in n for n in names)
    assert "lm_head.weight" not in names and "transformer.wte.weight" not in names
    optim.set_lr(opt, 5e-4, learning_rate=1e-3, muon_lr=0.05)  # half-way through warmup, say
    assert {g["lr"] for g in opt.param_groups} == {0.025, 5e-4}
    model(*batch())[1].backward()
    opt.step()
    state = opt.state_dict()
    fresh = optim.build_optimizer(tiny(**MODERN), "muon", 1e-3, 0.1, (0.9, 0.95), "cpu")
    fresh.load_state_dict(state)
    assert fresh.muon.state is fresh.state and len(fresh.state) == len(list(model.parameters()))
    assert [g["muon"] for g in fresh.muon.param_groups] == [True]


def test_bad_switch_values_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"pos_embedding must be one of \('learned', 'rope'\), got 'alibi'"):
        GPTConfig(pos_embedding="alibi")
    with pytest.raises(ValueError, match="logit_softcap must be 0 .off. or a positive cap, got -1"):
        GPTConfig(logit_softcap=-1.0)
    with pytest.raises(ValueError, match="head size n_embd / n_head = 5 must be even"):
        GPTConfig(n_embd=10, n_head=2, pos_embedding="rope")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        optim.build_optimizer(tiny(), "lion", 1e-3, 0.1, (0.9, 0.95), "cpu")
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(ValueError, match=r"needs torch.optim.Muon \(PyTorch >= 2.9\)"):
        optim.build_optimizer(tiny(), "muon", 1e-3, 0.1, (0.9, 0.95), "cpu")


def test_gpt2_export_refuses_a_modern_model(tmp_path):
    with pytest.raises(ValueError, match="pos_embedding='rope'.*cannot represent"):
        tiny(pos_embedding="rope").save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_switch_names_are_config_fields():
    assert set(SWITCHES) <= set(GPTConfig.__dataclass_fields__)
