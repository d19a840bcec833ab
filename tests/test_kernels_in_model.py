"""The Triton kernels plugged into the model: same training trajectory as PyTorch's implementations."""
import pytest
import torch

from conftest import HAS_CUDA, KERNEL_DEVICE
from model import GPT, GPTConfig
from tritongpt.impls import static_choice

CONFIG = GPTConfig(block_size=40, vocab_size=67, n_layer=2, n_head=2, n_embd=48, dropout=0.0, bias=True)


def train_losses(attn_impl, ln_impl, steps=2, T=37):
    torch.manual_seed(0)
    model = GPT(CONFIG, attn_impl, ln_impl).to(KERNEL_DEVICE)
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), KERNEL_DEVICE)
    data = torch.randint(0, CONFIG.vocab_size, (2, T + 1), generator=torch.Generator().manual_seed(1)).to(KERNEL_DEVICE)
    losses = []
    for _ in range(steps):
        _, loss = model(data[:, :-1], data[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_triton_impls_train_like_pytorch():
    """T=37 is not a multiple of any tile, and the head dim 48 / 2 = 24 is not a power of two."""
    reference = train_losses("sdpa", "torch")
    ours = train_losses("triton", "triton")
    assert ours == pytest.approx(reference, rel=1e-4, abs=1e-4)
    assert reference[-1] < reference[0]  # it did train


def test_mixed_impls_agree():
    reference = train_losses("eager", "torch", steps=1)
    assert train_losses("triton", "torch", steps=1) == pytest.approx(reference, rel=1e-4, abs=1e-4)
    assert train_losses("sdpa", "triton", steps=1) == pytest.approx(reference, rel=1e-4, abs=1e-4)


def test_auto_never_picks_the_interpreter_on_cpu():
    model = GPT(CONFIG, "auto", "auto")
    assert static_choice(model, torch.device("cpu"), torch.float32) == ("sdpa", "torch", "torch")


def test_the_model_runs_what_set_impl_says_without_resolving(monkeypatch):
    """`auto` runs PyTorch's until choose_impls picks; a forward never asks impls.py again."""
    from tritongpt import impls

    model = GPT(CONFIG, "auto", "auto")
    monkeypatch.setattr(impls, "static_choice", lambda *a: pytest.fail("resolved"))
    x = torch.randint(0, CONFIG.vocab_size, (1, 8))
    model(x)
    assert model.running == ("sdpa", "torch", "torch") and model.requested == ("auto", "auto", "auto")
    assert {m.impl for m in model.modules() if hasattr(m, "impl")} == {"sdpa", "torch"}
    model.set_impl("eager", "torch", "torch")  # a measured choice, say
    model(x)
    assert {m.impl for m in model.modules() if hasattr(m, "impl")} == {"eager", "torch"}


def test_triton_decoding_says_once_that_sdpa_runs_the_single_token_steps(capsys):
    model = GPT(CONFIG, "triton", "torch").to(KERNEL_DEVICE).eval()
    prompt = torch.randint(0, CONFIG.vocab_size, (1, 5), device=KERNEL_DEVICE)
    model.generate(prompt, 4, temperature=0)
    model.generate(prompt, 4, temperature=0)
    assert capsys.readouterr().err.count("single-token decoding steps run SDPA") == 1


@pytest.mark.gpu
def test_auto_picks_triton_on_cuda_where_supported():
    cuda = torch.device("cuda", torch.cuda.current_device())
    assert static_choice(GPT(CONFIG), cuda, torch.bfloat16)[:2] == ("triton", "triton")
    wide = GPTConfig(**{**vars(CONFIG), "n_embd": 256, "n_head": 1})  # a head of 256: beyond the kernel's 128
    assert static_choice(GPT(wide), cuda, torch.bfloat16)[0] == "sdpa"


@pytest.mark.gpu
def test_triton_impls_train_like_pytorch_in_bf16_on_gpu():
    assert HAS_CUDA
    losses = {}
    for attn_impl, ln_impl in (("sdpa", "torch"), ("triton", "triton")):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=256, vocab_size=65, n_layer=4, n_head=4, n_embd=256), attn_impl, ln_impl).cuda()
        optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cuda")
        data = torch.randint(0, 65, (8, 257), generator=torch.Generator().manual_seed(1)).cuda()
        losses[attn_impl] = []
        for _ in range(20):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(data[:, :-1], data[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[attn_impl].append(loss.item())
    assert losses["triton"] == pytest.approx(losses["sdpa"], rel=2e-2)


@pytest.mark.gpu
def test_triton_impls_compile_into_one_graph_with_dropout():
    """torch.compile(fullgraph=True) fails on any graph break: the kernels, their autograd wrappers and
    the dropout seed (drawn on the GPU, read by the kernels) must all trace."""
    config = GPTConfig(block_size=128, vocab_size=65, n_layer=2, n_head=4, n_embd=128, dropout=0.1)
    data = torch.randint(0, 65, (4, 129), generator=torch.Generator().manual_seed(1)).cuda()
    torch.manual_seed(0)
    model = GPT(config, "triton", "triton").cuda()
    compiled = torch.compile(model, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = compiled(data[:, :-1], data[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    # Without dropout the compiled model computes what the eager one does.
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager_logits, _ = model(data[:, :-1], data[:, 1:])
        compiled_logits, _ = compiled(data[:, :-1], data[:, 1:])
    assert torch.allclose(compiled_logits.float(), eager_logits.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("softcap", [0.0, 15.0])
def test_fused_cross_entropy_trains_like_pytorch_and_eval_keeps_the_logits(softcap):
    """ce_impl='triton': the training loss and every gradient as F.cross_entropy of the logits gives them,
    no logits returned in training; in eval mode the logits come back, as evaluation and sampling need."""
    config = GPTConfig(**{**vars(CONFIG), "logit_softcap": softcap})
    data = torch.randint(0, config.vocab_size, (2, 38), generator=torch.Generator().manual_seed(1)).to(KERNEL_DEVICE)
    x, y = data[:, :-1], data[:, 1:].clone()
    y[0, 5] = -1  # an ignored target
    results = {}
    for ce_impl in ("torch", "triton"):
        torch.manual_seed(0)
        model = GPT(config, "sdpa", "torch").to(KERNEL_DEVICE)
        model.set_impl("sdpa", "torch", ce_impl)
        logits, loss = model(x, y)
        loss.backward()
        results[ce_impl] = (logits, loss.detach(), {n: p.grad for n, p in model.named_parameters()})
        model.eval()
        assert model(x, y)[0].shape == (2, 37, config.vocab_size)
    assert results["triton"][0] is None and results["torch"][0] is not None
    torch.testing.assert_close(results["triton"][1], results["torch"][1], rtol=1e-5, atol=1e-5)
    for name, grad in results["torch"][2].items():
        torch.testing.assert_close(results["triton"][2][name], grad, rtol=1e-4, atol=1e-6, msg=name)
