"""impls.choose_impls: the checks and the choice, with injected timings, where the kernels run: on the GPU
when there is one, else on the CPU under Triton's interpreter (conftest.KERNEL_DEVICE)."""
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.nn import functional as F

from conftest import KERNEL_DEVICE, REPO
from model import GPT, GPTConfig
from tritongpt.ops import kernels_module
from tritongpt.impls import choose_impls, make_timer, sdpa_backend

CONFIG = {"block_size": 32, "vocab_size": 65, "n_layer": 1, "n_head": 2, "n_embd": 32, "dropout": 0.0}
BATCH = 2


def tiny_model(attn_impl="auto", ln_impl="auto", bias=True, ce_impl="torch", device=KERNEL_DEVICE):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG, bias=bias)).to(device)
    model.set_impl(attn_impl, ln_impl, ce_impl)
    return model


class FakeTimer:
    """Answers the given milliseconds per candidate ("attn_impl=triton", ...), without running it (the
    interpreter is slow) unless run=True."""

    def __init__(self, ms, run=False):
        self.ms = ms
        self.run = run
        self.calls = []

    def __call__(self, name, fn):
        self.calls.append(name)
        if self.run:
            fn()
        return self.ms[name]


def timings(attn_triton=2.0, attn_sdpa=2.0, ln_triton=2.0, ln_torch=2.0, run=False, ce_triton=2.0,
            ce_torch=2.0):
    ms = {"attn_impl=triton": attn_triton, "attn_impl=sdpa": attn_sdpa, "ln_impl=triton": ln_triton,
          "ln_impl=torch": ln_torch, "ce_impl=triton": ce_triton, "ce_impl=torch": ce_torch}
    return FakeTimer(ms, run)


def count_calls(monkeypatch, module, names):
    """Count the calls of module.<name> for each name, still calling the real function."""
    calls = dict.fromkeys(names, 0)

    def counting(name, original):
        def counted(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        return counted

    for name in names:
        monkeypatch.setattr(module, name, counting(name, getattr(module, name)))
    return calls


def never_called(name, fn):
    raise AssertionError(f"the timer was called for {name}")


def choose(model, device=KERNEL_DEVICE, **kwargs):
    """choose_impls on `device`, measuring `auto` (off CUDA it would not: PyTorch's is the only choice there)."""
    lines = []
    kwargs.setdefault("measure", True)
    choice = choose_impls(model, BATCH, device, torch.float32, log=lines.append, **kwargs)
    return choice, lines


def impls_in_layers(model):
    return {m.impl for m in model.modules() if hasattr(m, "impl")}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("attn_ms, ln_ms, expected", [
    ((1.0, 2.0), (3.0, 2.0), ("triton", "torch")),
    ((3.0, 2.0), (1.0, 2.0), ("sdpa", "triton")),
])
def test_the_faster_is_chosen_for_each(attn_ms, ln_ms, expected, bias):
    model = tiny_model(bias=bias)
    timer = timings(*attn_ms, *ln_ms)
    choice, lines = choose(model, timer=timer)
    assert choice == expected
    assert (model.running.attn, model.running.ln) == expected
    assert model.transformer.h[0].attn.impl == expected[0]
    block = model.transformer.h[0]
    assert {block.ln_1.impl, block.ln_2.impl, model.transformer.ln_f.impl} == {expected[1]}
    assert sorted(timer.calls) == ["attn_impl=sdpa", "attn_impl=triton", "ln_impl=torch", "ln_impl=triton"]
    assert len(lines) == 2


def test_what_is_timed_is_each_candidates_forward_and_backward(monkeypatch):
    kernel_calls = count_calls(monkeypatch, kernels_module(), ["flash_attention", "layer_norm"])
    torch_calls = count_calls(monkeypatch, F, ["scaled_dot_product_attention", "layer_norm"])
    grads = count_calls(monkeypatch, torch.autograd, ["grad"])
    choose(tiny_model(), timer=timings(run=True))
    # once in the agreement check, once timed (the fake timer runs each candidate once)
    assert kernel_calls == {"flash_attention": 2, "layer_norm": 2}
    # PyTorch's: in the check (in float64 and in the run's dtype), then timed
    assert torch_calls == {"scaled_dot_product_attention": 3, "layer_norm": 3}
    assert grads["grad"] == 2 * (3 + 2)  # every run is forward + backward


def test_a_tie_keeps_pytorchs():
    choice, lines = choose(tiny_model(), timer=timings())
    assert choice == ("sdpa", "torch")
    assert all(line.endswith(("-> sdpa", "-> torch")) for line in lines)


def test_the_log_line_has_both_times_the_shapes_and_the_choice():
    _, lines = choose(tiny_model(bias=False), timer=timings(1.84, 2.1, 0.52, 0.41))
    assert lines == [
        "attn_impl=auto: triton 1.84 ms, sdpa 2.10 ms (forward+backward, B=2 H=2 T=32 D=16 float32, sdpa's backend "
        f"{sdpa_backend(*[torch.zeros(2, 2, 32, 16, device=KERNEL_DEVICE)] * 3, True)}) -> triton",
        "ln_impl=auto: triton 0.52 ms, torch 0.41 ms (forward+backward, x 2x32x32 no bias float32) -> torch",
    ]


def test_only_auto_is_measured_each_on_its_own():
    timer = timings(attn_triton=1.0, attn_sdpa=2.0)
    choice, lines = choose(tiny_model("auto", "torch"), timer=timer)
    assert choice == ("triton", "torch")
    assert sorted(timer.calls) == ["attn_impl=sdpa", "attn_impl=triton"]
    assert len(lines) == 1 and lines[0].startswith("attn_impl=auto:")


def wrong_attention(q, k, v, causal=True, dropout_p=0.0):
    return F.scaled_dot_product_attention(q, k, v, is_causal=False)  # sees the future


def nan_attention(q, k, v, causal=True, dropout_p=0.0):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True) * float("nan")


def unweighted_layer_norm(x, weight, bias=None, eps=1e-5):
    return F.layer_norm(x, weight.shape, None, None, eps)  # ignores weight and bias


@pytest.mark.parametrize("kernel, wrong, option, fallback", [
    ("flash_attention", wrong_attention, "attn_impl", "sdpa"),
    ("flash_attention", nan_attention, "attn_impl", "sdpa"),
    ("layer_norm", unweighted_layer_norm, "ln_impl", "torch"),
])
def test_a_kernel_that_disagrees_is_not_chosen_even_if_faster(monkeypatch, kernel, wrong, option, fallback):
    monkeypatch.setattr(kernels_module(), kernel, wrong)
    timer = timings(attn_triton=0.1, ln_triton=0.1)
    choice, lines = choose(tiny_model(), timer=timer)
    assert choice == {"attn_impl": (fallback, "triton"), "ln_impl": ("triton", fallback)}[option]
    assert not any(name.startswith(option) for name in timer.calls)  # not even timed
    (line,) = [line for line in lines if line.startswith(option)]
    assert re.fullmatch(rf"{option}=auto: triton disagrees: its \w+ is off by .* from float64, {fallback}'s by "
                        rf".* \(allowed .*\) \(.*\) -> {fallback}", line), line


def test_a_kernel_that_fails_is_not_chosen(monkeypatch):
    def out_of_resources(*args, **kwargs):
        raise RuntimeError("out of resources: shared memory")

    monkeypatch.setattr(kernels_module(), "flash_attention", out_of_resources)
    choice, lines = choose(tiny_model(), timer=timings(attn_triton=0.1, ln_triton=0.1))
    assert choice == ("sdpa", "triton")
    assert lines[0].startswith("attn_impl=auto: triton failed: RuntimeError: out of resources")
    assert lines[0].endswith("-> sdpa")


@pytest.mark.parametrize("attn_impl, ln_impl", [
    ("sdpa", "torch"), ("eager", "torch"), ("triton", "triton"), ("eager", "triton"), ("triton", "torch"),
])
def test_forced_impls_are_applied_without_measuring(attn_impl, ln_impl):
    model = tiny_model(attn_impl, ln_impl)
    choice, lines = choose(model, timer=never_called)
    assert choice == (attn_impl, ln_impl) == (model.running.attn, model.running.ln)
    assert impls_in_layers(model) == {attn_impl, ln_impl}
    assert lines == []


@pytest.mark.parametrize("measure", [None, False])
def test_auto_on_cpu_stays_pytorchs_unless_asked_to_measure(measure):
    model = tiny_model(device="cpu")
    choice, lines = choose(model, "cpu", measure=measure, timer=never_called)
    assert choice == ("sdpa", "torch")
    assert lines == []


def test_the_model_runs_the_choice_without_resolving_again(monkeypatch):
    """Once chosen, the model runs the choice: its forward asks nothing of impls.py."""
    model = tiny_model()
    choose(model, timer=timings(attn_triton=1.0, ln_triton=1.0))
    calls = count_calls(monkeypatch, kernels_module(), ["flash_attention", "layer_norm"])
    from tritongpt import impls

    for name in ("choose_impls", "static_choice"):
        monkeypatch.setattr(impls, name, lambda *args, **kwargs: pytest.fail("resolved again"))
    idx = torch.randint(0, CONFIG["vocab_size"], (BATCH, CONFIG["block_size"]), device=KERNEL_DEVICE)
    _, loss = model(idx, idx)
    loss.backward()
    assert calls == {"flash_attention": CONFIG["n_layer"], "layer_norm": 2 * CONFIG["n_layer"] + 1}


def test_measuring_leaves_the_random_stream_alone():
    model = tiny_model()  # which seeds the generators
    state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state() if KERNEL_DEVICE == "cuda" else None
    choose(model, timer=timings())
    assert torch.equal(torch.get_rng_state(), state)
    if cuda_state is not None:
        assert torch.equal(torch.cuda.get_rng_state(), cuda_state)


def test_the_default_timer_warms_up_then_takes_the_median_of_repeats():
    calls = []
    ms = make_timer(torch.device("cpu"), warmup=2, repeats=5)("x", lambda: calls.append(1))
    assert len(calls) == 7 and 0.0 <= ms < 100.0


# -----------------------------------------------------------------------------
# torch.distributed: rank 0 measures and broadcasts, the others apply its choice


@pytest.fixture
def one_process_group(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", rank=0, world_size=1, store=store)
    yield
    dist.destroy_process_group()


@pytest.fixture
def broadcasts(monkeypatch):
    """Records what each broadcast_object_list call sent (after it ran, through the real one)."""
    sent = []
    real = dist.broadcast_object_list

    def recording(objects, src=0, **kwargs):
        real(objects, src=src, **kwargs)
        sent.append((list(objects), src))

    monkeypatch.setattr(dist, "broadcast_object_list", recording)
    return sent


def test_rank_0_measures_and_broadcasts_its_choice(one_process_group, broadcasts):
    model = tiny_model()
    choice, lines = choose(model, timer=timings(attn_triton=1.0, ln_torch=1.0))
    assert choice == ("triton", "torch") == (model.running.attn, model.running.ln)
    assert broadcasts == [(["triton", "torch", "torch"], 0)]  # and the loss's (ce_impl='torch' here)
    assert len(lines) == 2


def test_forced_choices_are_broadcast_too(one_process_group, broadcasts):
    choice, _ = choose(tiny_model("eager", "triton"), timer=never_called)
    assert choice == ("eager", "triton")
    assert broadcasts == [(["eager", "triton", "torch"], 0)]


def test_when_rank_0_fails_it_releases_the_other_ranks_before_raising(one_process_group, broadcasts):
    def broken(name, fn):
        if name == "attn_impl=sdpa":
            raise RuntimeError("broken timer")
        return 1.0

    with pytest.raises(RuntimeError, match="broken timer"):
        choose(tiny_model(), timer=broken)
    assert broadcasts == [([None, None, None], 0)]


def pretend_to_be_rank_1(monkeypatch, rank_0_sends):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)

    def receive(objects, src=0, **kwargs):
        assert src == 0
        objects[:] = rank_0_sends

    monkeypatch.setattr(dist, "broadcast_object_list", receive)


def test_other_ranks_apply_rank_0s_choice_without_measuring_or_logging(monkeypatch):
    pretend_to_be_rank_1(monkeypatch, ["triton", "triton", "triton"])
    model = tiny_model(ce_impl="auto")
    choice, lines = choose(model, timer=never_called)
    assert choice == ("triton", "triton") == (model.running.attn, model.running.ln)
    assert model.running.ce == "triton"
    assert impls_in_layers(model) == {"triton"}
    assert lines == []


def test_other_ranks_raise_when_rank_0_failed(monkeypatch):
    pretend_to_be_rank_1(monkeypatch, [None, None, None])
    with pytest.raises(RuntimeError, match="rank 0 failed"):
        choose(tiny_model(), timer=never_called)


def test_importing_needs_neither_the_kernels_nor_triton():
    code = "import sys; from tritongpt import impls; assert not {'kernels', 'triton'} & set(sys.modules), sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={**os.environ, "TRITON_INTERPRET": "0"})


@pytest.mark.parametrize("ce_ms, expected", [((1.0, 2.0), "triton"), ((2.0, 1.0), "torch")])
def test_the_fused_cross_entropy_is_measured_too(ce_ms, expected):
    """ce_impl='auto': the fused linear cross-entropy is checked against F.cross_entropy of the logits (on the
    run's shapes: batch x block_size rows, the vocabulary) and kept when faster; training then uses it."""
    model = tiny_model("sdpa", "torch", ce_impl="auto")
    timer = timings(ce_triton=ce_ms[0], ce_torch=ce_ms[1], run=True)
    choose(model, timer=timer)
    assert timer.calls == ["ce_impl=triton", "ce_impl=torch"] and model.running.ce == expected


def test_a_fused_cross_entropy_that_disagrees_is_not_chosen(monkeypatch):
    import kernels

    model = tiny_model("sdpa", "torch", ce_impl="auto")
    wrong = kernels.linear_cross_entropy
    monkeypatch.setattr(kernels, "linear_cross_entropy", lambda x, w, t, cap: wrong(x, w, t, cap) * 1.01)
    choice, lines = choose(model, timer=timings(ce_triton=0.1))
    assert model.running.ce == "torch" and "ce_impl=auto: triton disagrees: its loss" in lines[0]


@pytest.mark.parametrize("causal", [True, False])
def test_the_named_sdpa_backend_is_the_one_that_runs(causal):
    """What auto's log (and bench/attn.py) call SDPA's backend: forced alone, it gives the default's very output."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 32, generator=gen).to(KERNEL_DEVICE) for _ in range(3))
    name = sdpa_backend(q, k, v, causal)
    assert name in {"flash_attention", "efficient_attention", "cudnn_attention", "math"}
    default = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    with sdpa_kernel(getattr(SDPBackend, name.upper())):
        assert torch.equal(F.scaled_dot_product_attention(q, k, v, is_causal=causal), default)
