"""Tests for kernels/flash_attention.py: forward and gradients against a float64 PyTorch reference.

Without a GPU the kernels run in Triton's interpreter, by default with 32-row held tiles and 16-row streamed
tiles, so T = 15, 16, 17, 31, 33 sit on either side of the tile edges; the cases are picked by hand to cover
the edges without a slow cartesian product. Every tiling of the GPU's autotuning spaces (kernels/tuning.py) also
runs here, passed in through flash_attention's `tiles`, on lengths spanning several of its tiles with a ragged
last one, in both backward designs (one-pass with atomic dQ, and deterministic).

Low precision: the interpreter's dots take fp32 operands, so the kernels round P, dS and the outputs to
bf16/fp16 themselves (to nearest, as a GPU does) and the errors measured are the GPU path's. What stays
unverifiable without a GPU: TF32's rounding of fp32 dots (the interpreter multiplies in full fp32), the
summation order inside tensor-core instructions, the hardware exp2's last-bit error, and warps and stages
(scheduling only). Tests marked `gpu` cover those, with long sequences, and are skipped without CUDA.
"""
import math

import pytest
import torch
import triton
import triton.language as tl
from conftest import KERNEL_DEVICE

import importlib

from kernels import common, tuning
from dropout_masks import dropout_mask
from kernels.flash_attention import _dropout_keep, attention_reference, flash_attention, flash_attention_supported

DEVICE = KERNEL_DEVICE
flash_module = importlib.import_module("kernels.flash_attention")  # the package exports a function of that name


def randn(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=DEVICE, dtype=dtype)


def forward_backward(fn, q, k, v, do, **kwargs):
    """fn(q, k, v, **kwargs) and its gradients for upstream gradient `do`, on fresh leaf copies."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves, **kwargs)
    out.backward(do)
    return [out.detach()] + [x.grad for x in leaves]


def reference64(q, k, v, do, **kwargs):
    return forward_backward(attention_reference, q.double(), k.double(), v.double(), do.double(), **kwargs)


def max_err(actual, expected):
    return (actual.double() - expected.double()).abs().max().item()


def assert_matches(actual, expected, rel=1e-4):
    """Max abs error within `rel` of the larger of the expected magnitude and 1 (fp32 accuracy)."""
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert a.shape == e.shape
        bound = rel * max(1.0, e.abs().max().item())
        err = max_err(a, e)
        assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g}"


def assert_flash_rule(actual, torch_low, expected, eps=1e-3):
    """FlashAttention's rule: error vs fp64 at most twice that of PyTorch's own low-precision math."""
    for name, a, t, e in zip(("out", "dq", "dk", "dv"), actual, torch_low, expected):
        err, torch_err = max_err(a, e), max_err(t, e)
        assert err <= 2 * torch_err + eps, f"{name}: error {err:.3g} vs PyTorch's {torch_err:.3g}"


# (B, H, T, D, causal)
FP32_CASES = [
    (1, 1, 1, 16, True),  # a single token
    (1, 2, 1, 64, False),
    (2, 3, 15, 32, True),  # streamed tile - 1
    (1, 2, 16, 48, False),  # exactly one streamed tile
    (2, 1, 17, 64, True),  # streamed tile + 1
    (1, 1, 31, 80, False),  # held tile - 1
    (1, 2, 33, 128, True),  # held tile + 1
    (2, 2, 47, 96, True),
    (1, 1, 64, 128, False),
    (1, 2, 257, 64, True),  # a few hundred
    (1, 1, 300, 48, False),
]


@pytest.mark.parametrize("B,H,T,D,causal", FP32_CASES)
def test_fp32_matches_reference(B, H, T, D, causal):
    q, k, v, do = (randn(B, H, T, D, seed=s) for s in range(4))
    actual = forward_backward(flash_attention, q, k, v, do, causal=causal)
    assert_matches(actual, reference64(q, k, v, do, causal=causal))


@pytest.mark.parametrize("dtype,B,H,T,D,causal", [
    (torch.bfloat16, 2, 2, 33, 64, True),
    (torch.bfloat16, 1, 1, 100, 128, False),
    (torch.float16, 1, 2, 47, 48, False),
    (torch.float16, 1, 1, 17, 80, True),
])
def test_low_precision_within_twice_pytorch_error(dtype, B, H, T, D, causal):
    q, k, v, do = (randn(B, H, T, D, dtype=dtype, seed=s) for s in range(4))
    actual = forward_backward(flash_attention, q, k, v, do, causal=causal)
    assert all(x.dtype == dtype for x in actual)
    torch_low = forward_backward(attention_reference, q, k, v, do, causal=causal)
    assert_flash_rule(actual, torch_low, reference64(q, k, v, do, causal=causal))


# -----------------------------------------------------------------------------
# Every tiling a GPU launches, run numerically in the interpreter (the default tiles there are small ones)

def _numeric_tilings():
    """Every tiling of the GPU's autotuning spaces that differs in its numbers (warps and stages change nothing
    in the interpreter), each once: each backward tiling (one-pass and deterministic designs alike) paired
    with a forward one so that every forward tiling runs too, with the dtype and dropout setting of a space
    that holds them."""
    cases = tuning.attention_space_cases()

    def numeric(kernel):
        distinct = {}
        for tiles, (_, dtype, dropout, _, _) in cases[kernel].items():
            key = (tiles.held, tiles.streamed)
            if key not in distinct or (dropout and not distinct[key][2]):  # a tiling dropout runs on: with it
                distinct[key] = (tiles, dtype, dropout)
        return sorted(distinct.values(), key=lambda value: (-value[0].held, -value[0].streamed))

    forward = numeric("forward")
    backward = sorted([(value, False) for value in numeric("backward")]
                      + [(value, True) for value in numeric("deterministic")],
                      key=lambda item: (-item[0][0].held, -item[0][0].streamed))
    assert len(backward) >= len(forward)
    params = []
    for i, ((bwd, bwd_dtype, bwd_dropout), deterministic) in enumerate(backward):
        # big tiles with big ones, so that no case runs small tiles over a length sized for 128-row ones
        fwd, dtype, dropout = forward[i * len(forward) // len(backward)]
        params.append(pytest.param(
            (fwd, bwd), deterministic, dtype if dtype == bwd_dtype else torch.float32, dropout and bwd_dropout,
            id=f"fwd{fwd.held}x{fwd.streamed}-{'det' if deterministic else 'bwd'}{bwd.held}x{bwd.streamed}"))
    return params


GPU_TILINGS = _numeric_tilings()


def tiling_lengths(tiles):
    """A length under one held tile, and one spanning two and a half of the largest tile: several tiles, the
    causal diagonal crossing them, and a ragged last tile in every kernel."""
    largest = max(tiles[0].held, tiles[1].held)
    return (largest // 2 + 3, 2 * largest + largest // 2 + 3)


def test_gpu_tilings_are_all_checked():
    """Every numerically distinct tiling of each kernel's space runs in the tests below, the 128-row held tiles
    of the forward and of the one-pass backward among them."""
    ran = {(p.values[0][0].held, p.values[0][0].streamed) for p in GPU_TILINGS}
    ran_backward = {(p.values[0][1].held, p.values[0][1].streamed, p.values[1]) for p in GPU_TILINGS}
    for kernel, tilings in tuning.attention_space_cases().items():
        for tiles in tilings:
            if kernel == "forward":
                assert (tiles.held, tiles.streamed) in ran
            else:
                assert (tiles.held, tiles.streamed, kernel == "deterministic") in ran_backward
    assert {(128, 64), (128, 32)} <= ran and (128, 32, False) in ran_backward
    # the forward tilings of the fp16/bf16 dropout space run with dropout, and backward ones of both designs
    with_dropout = [p.values[0] for p in GPU_TILINGS if p.values[3]]
    assert {(128, 32), (64, 32)} <= {(fwd.held, fwd.streamed) for fwd, _ in with_dropout}
    assert {p.values[1] for p in GPU_TILINGS if p.values[3]} == {True, False}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tiles,deterministic,dtype,dropout", GPU_TILINGS)
def test_gpu_tiling_fp32_matches_reference(tiles, deterministic, dtype, dropout, causal):
    for T in tiling_lengths(tiles):
        q, k, v, do = (randn(1, 2, T, 40, seed=s) for s in range(4))
        actual = forward_backward(flash_attention, q, k, v, do, causal=causal, tiles=tiles,
                                  deterministic=deterministic)
        assert_matches(actual, reference64(q, k, v, do, causal=causal))
    if dropout and causal:  # the tiles dropout picks (Philox is slow in the interpreter: one head, one length)
        p, seed = 0.2, 77
        q, k, v, do = (randn(1, 1, T, 40, seed=s) for s in range(4))
        actual = forward_backward(flash_attention, q, k, v, do, causal=causal, dropout_p=p, seed=seed, tiles=tiles,
                                  deterministic=deterministic)
        mask = dropout_mask(seed, 1, 1, T, p, DEVICE)
        assert_matches(actual, reference64(q, k, v, do, causal=causal, dropout_mask=mask, dropout_p=p))


@pytest.mark.parametrize("tiles,deterministic,dtype,dropout", [p for p in GPU_TILINGS if p.values[2] != torch.float32])
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_gpu_tiling_low_precision_within_twice_pytorch_error(tiles, deterministic, dtype, dropout, low):
    T = tiling_lengths(tiles)[1]
    q, k, v, do = (randn(1, 2, T, 64, dtype=low, seed=s) for s in range(4))
    actual = forward_backward(flash_attention, q, k, v, do, causal=True, tiles=tiles, deterministic=deterministic)
    torch_low = forward_backward(attention_reference, q, k, v, do, causal=True)
    assert_flash_rule(actual, torch_low, reference64(q, k, v, do, causal=True))


@pytest.mark.parametrize("causal", [True, False])
def test_both_backward_designs_agree_and_the_deterministic_one_repeats_exactly(causal, monkeypatch):
    """The one-pass backward (dQ summed with atomics) and the deterministic one compute the same gradients;
    torch.use_deterministic_algorithms picks the deterministic one (by default the one-pass one runs), whose
    gradients repeat bit for bit. (The interpreter runs programs in order, so its atomics repeat too: which
    design ran is checked directly.)"""
    designs = []
    backward = flash_module._backward

    def recording_backward(*args):
        designs.append(args[13])  # the `deterministic` argument
        return backward(*args)

    monkeypatch.setattr(flash_module, "_backward", recording_backward)
    q, k, v, do = (randn(2, 2, 45, 40, seed=s) for s in range(4))
    one_pass = forward_backward(flash_attention, q, k, v, do, causal=causal)
    assert_matches(one_pass, reference64(q, k, v, do, causal=causal))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [forward_backward(flash_attention, q, k, v, do, causal=causal) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert designs == [False, True, True]
    for a, b, c in zip(*runs, one_pass):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_custom_softmax_scale():
    q, k, v, do = (randn(1, 2, 40, 32, seed=s) for s in range(4))
    actual = forward_backward(flash_attention, q, k, v, do, causal=True, softmax_scale=0.5)
    assert_matches(actual, reference64(q, k, v, do, causal=True, softmax_scale=0.5))


@pytest.mark.parametrize("causal", [True, False])
def test_views_of_fused_qkv(causal):
    """The model's layout: q, k, v are strided views of one (B, T, 3, H, D) projection; dO is strided too."""
    B, T, H, D = 2, 37, 3, 48
    qkv = randn(B, T, 3 * H * D).requires_grad_()
    q, k, v = (x.transpose(1, 2) for x in qkv.view(B, T, 3, H, D).unbind(2))
    assert not q.is_contiguous()
    do = randn(B, T, H, D, seed=1).transpose(1, 2)
    out = flash_attention(q, k, v, causal=causal)
    out.backward(do)

    qkv64 = qkv.detach().double().requires_grad_()
    q64, k64, v64 = (x.transpose(1, 2) for x in qkv64.view(B, T, 3, H, D).unbind(2))
    ref = attention_reference(q64, k64, v64, causal)
    ref.backward(do.double())
    assert_matches([out, qkv.grad], [ref, qkv64.grad])


def test_strided_head_dim_and_broadcast_grad():
    """Head-dim stride != 1, and the stride-0 upstream gradient that out.sum().backward() produces."""
    B, H, T, D = 1, 2, 20, 32
    q, k, v = (randn(B, H, T, 2 * D, seed=s)[..., ::2] for s in range(3))
    assert q.stride(-1) == 2
    do = torch.ones(B, H, T, D, device=DEVICE)
    actual = forward_backward(lambda *x: flash_attention(*x).sum(), q, k, v, torch.tensor(1.0, device=DEVICE))
    expected = reference64(q, k, v, do, causal=True)
    out = flash_attention(q, k, v)
    assert_matches([out] + actual[1:], expected)


def test_output_is_stored_head_interleaved():
    """Documented layout: merging heads with transpose(1, 2) after the kernel needs no copy."""
    q = randn(2, 3, 5, 16)
    assert flash_attention(q, q, q).transpose(1, 2).is_contiguous()


def test_batch_entries_are_independent():
    """Adding batch entries leaves the others' results bit-identical, dropout included."""
    q, k, v = (randn(2, 2, 24, 32, seed=s) for s in range(3))
    both = flash_attention(q, k, v, dropout_p=0.2, seed=5)
    first = flash_attention(q[:1], k[:1], v[:1], dropout_p=0.2, seed=5)
    assert torch.equal(both[:1], first)


# Dropout


@pytest.mark.parametrize("B,H,T,D,causal", [(2, 2, 37, 32, True), (1, 3, 33, 64, False)])
def test_dropout_matches_reference_given_kernel_mask(B, H, T, D, causal):
    p, seed = 0.3, 1234
    q, k, v, do = (randn(B, H, T, D, seed=s) for s in range(4))
    actual = forward_backward(flash_attention, q, k, v, do, causal=causal, dropout_p=p, seed=seed)
    mask = dropout_mask(seed, B, H, T, p, DEVICE)
    expected = reference64(q, k, v, do, causal=causal, dropout_mask=mask, dropout_p=p)
    assert_matches(actual, expected)
    # The mask must matter: without it the result is different.
    assert max_err(actual[0], reference64(q, k, v, do, causal=causal)[0]) > 1e-2


def test_dropout_reproducible_from_seed():
    q, k, v, do = (randn(1, 2, 40, 32, seed=s) for s in range(4))
    run = lambda **kw: forward_backward(flash_attention, q, k, v, do, dropout_p=0.5, **kw)
    first, again, other = run(seed=7), run(seed=7), run(seed=8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    torch.manual_seed(3)
    drawn = run()
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(drawn, run()))
    assert not torch.equal(drawn[0], run()[0])


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate(p):
    B, H, T = 2, 3, 64
    mask = dropout_mask(99, B, H, T, p, DEVICE)
    assert mask.shape == (B, H, T, T) and mask.dtype == torch.bool
    n = mask.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(mask.float().mean().item() - (1 - p)) < 5 * sigma
    # Heads and batch entries get their own patterns, not one repeated.
    assert not torch.equal(mask[0, 0], mask[0, 1]) and not torch.equal(mask[0, 0], mask[1, 0])


def test_dropout_mask_is_pure_function_of_global_index():
    small = dropout_mask(11, 1, 2, 19, 0.5, DEVICE)
    large = dropout_mask(11, 3, 2, 19, 0.5, DEVICE)
    assert torch.equal(small[0], large[0])
    assert not torch.equal(dropout_mask(12, 1, 2, 19, 0.5, DEVICE), small)


@triton.jit
def _keep_mask_of_head(OUT, seed, bh, T, dropout_p, BLOCK: tl.constexpr):
    idx = tl.arange(0, BLOCK)
    keep = _dropout_keep(seed, bh, idx[:, None], idx[None, :], T, dropout_p)
    tl.store(OUT + idx[:, None] * BLOCK + idx[None, :], keep.to(tl.int8))


def test_dropout_counter_does_not_wrap_at_32_bits():
    """Head 2^24 of a T=16 problem starts at global index 2^32: int32 math would repeat head 0's mask."""
    T = 16
    masks = []
    for bh in (0, 2**24):
        out = torch.empty(T, T, dtype=torch.int8, device=DEVICE)
        _keep_mask_of_head[(1,)](out, 3, bh, T, 0.5, BLOCK=T)
        masks.append(out.bool())
    assert torch.equal(masks[0], dropout_mask(3, 1, 1, T, 0.5, DEVICE)[0, 0])
    assert not torch.equal(masks[0], masks[1])


# Validation and capability checks


@pytest.mark.parametrize("shapes,dtype,kwargs,message", [
    ([(2, 8, 16)] * 3, torch.float32, {}, "expected 4 dims"),
    ([(1, 2, 8, 16), (1, 2, 9, 16), (1, 2, 9, 16)], torch.float32, {}, "shapes differ"),
    ([(1, 2, 0, 16)] * 3, torch.float32, {}, "empty"),
    ([(1, 2, 8, 8)] * 3, torch.float32, {}, r"head dim D=8 is outside the supported 16\.\.128; use attn_impl='sdpa'"),
    ([(1, 2, 8, 256)] * 3, torch.float32, {}, r"head dim D=256 is outside"),
    ([(1, 2, 8, 16)] * 3, torch.float64, {}, "unsupported dtypes"),
    ([(1, 2, 8, 16)] * 3, torch.float32, {"dropout_p": 1.0}, r"dropout_p=1.0 must be in \[0, 1\)"),
    ([(1, 2, 8, 16)] * 3, torch.float32, {"dropout_p": -0.1}, r"dropout_p=-0.1 must be in \[0, 1\)"),
    ([(1, 2, 8, 16)] * 3, torch.float32, {"dropout_p": 0.1, "seed": -1}, r"seed=-1 must be an int in \[0, 2\*\*63\)"),
    ([(1, 2, 8, 16)] * 3, torch.float32, {"dropout_p": 0.1, "seed": 1.5}, r"seed=1.5 must be an int"),
    ([(1, 2, 8, 16)] * 3, torch.float32, {"softmax_scale": 0.0}, r"softmax_scale=0.0 must be > 0"),
    ([(1, 2, 8, 16)] * 3, torch.float32, {"softmax_scale": -0.25}, r"softmax_scale=-0.25 must be > 0"),
])
def test_rejects_bad_input(shapes, dtype, kwargs, message):
    q, k, v = (torch.zeros(s, dtype=dtype, device=DEVICE) for s in shapes)
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, **kwargs)


def test_rejects_mixed_dtypes():
    q = torch.zeros(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="unsupported dtypes"):
        flash_attention(q, q.half(), q)


def test_rejects_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setattr(common, "_INTERPRET", False)
    q = torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"attn_impl='triton' needs a CUDA GPU, but the tensors are on cpu; "
                                         r"use attn_impl='sdpa', or set TRITON_INTERPRET=1"):
        flash_attention(q, q, q)


def test_supported_never_picks_cpu():
    for dtype in (torch.float32, torch.bfloat16):
        assert not flash_attention_supported(64, dtype, torch.device("cpu"))


@pytest.mark.gpu
def test_supported_on_gpu():
    cuda = torch.device("cuda")
    assert flash_attention_supported(64, torch.float16, cuda)
    assert flash_attention_supported(80, torch.float32, cuda)
    assert not flash_attention_supported(8, torch.float16, cuda)
    assert not flash_attention_supported(256, torch.float16, cuda)
    assert not flash_attention_supported(64, torch.float64, cuda)


# GPU only: real tile sizes, long sequences, memory


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,T,D,causal", [
    (2, 4, 1024, 64, True),
    (2, 2, 1000, 80, False),
    (1, 2, 4096, 128, True),
    (1, 2, 4096, 64, False),
])
def test_gpu_low_precision_long_sequences(dtype, B, H, T, D, causal):
    q, k, v, do = (randn(B, H, T, D, dtype=dtype, seed=s) for s in range(4))
    actual = forward_backward(flash_attention, q, k, v, do, causal=causal)
    torch_low = forward_backward(attention_reference, q, k, v, do, causal=causal)
    assert_flash_rule(actual, torch_low, reference64(q, k, v, do, causal=causal), eps=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,T,D,causal", [(2, 3, 513, 64, True), (1, 2, 300, 96, False)])
def test_gpu_fp32_matches_reference(B, H, T, D, causal, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    q, k, v, do = (randn(B, H, T, D, seed=s) for s in range(4))
    actual = forward_backward(flash_attention, q, k, v, do, causal=causal)
    assert_matches(actual, reference64(q, k, v, do, causal=causal))


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_fp32_with_tf32_matches_reference(D, monkeypatch):
    """train.py allows TF32, which gives fp32 inputs their own tile sizes: judged against PyTorch's own
    attention with TF32 matmuls, by the FlashAttention rule."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    q, k, v, do = (randn(2, 3, 333, D, seed=s) for s in range(4))
    actual = forward_backward(flash_attention, q, k, v, do, causal=True)
    torch_tf32 = forward_backward(attention_reference, q, k, v, do, causal=True)
    assert_flash_rule(actual, torch_tf32, reference64(q, k, v, do, causal=True), eps=1e-4)


@pytest.mark.gpu
def test_gpu_dropout_matches_reference_given_kernel_mask():
    B, H, T, D, p = 2, 2, 700, 64, 0.1
    q, k, v, do = (randn(B, H, T, D, dtype=torch.bfloat16, seed=s) for s in range(4))
    actual = forward_backward(flash_attention, q, k, v, do, dropout_p=p, seed=42)
    mask = dropout_mask(42, B, H, T, p, DEVICE)
    torch_low = forward_backward(attention_reference, q, k, v, do, causal=True, dropout_mask=mask, dropout_p=p)
    expected = reference64(q, k, v, do, causal=True, dropout_mask=mask, dropout_p=p)
    assert_flash_rule(actual, torch_low, expected, eps=1e-4)


@pytest.mark.gpu
def test_gpu_memory_is_linear_in_sequence_length():
    B, H, T, D = 1, 8, 16384, 64  # one T x T fp16 score matrix per head would take 4 GiB
    q, k, v = (randn(B, H, T, D, dtype=torch.float16, seed=s).requires_grad_() for s in range(3))
    # The first call autotunes every kernel at this length, and Triton's benchmark flushes the L2 cache
    # with a buffer of its own (256 MB, 16x q here): not the kernels' memory. Measure the second call.
    flash_attention(q, k, v).backward(torch.ones_like(q))
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = flash_attention(q, k, v)
    torch.cuda.synchronize()
    # Output plus the fp32 row logsumexp, with slack; nothing proportional to T^2.
    assert torch.cuda.max_memory_allocated() - before <= 2 * q.nbytes
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    # dq, dk, dv, delta and the upstream gradient.
    assert torch.cuda.max_memory_allocated() - before <= 8 * q.nbytes


def tf32_rounded(x):
    """x rounded to nearest TF32 (ties away from zero), as cuBLAS rounds the operands of a TF32 matmul."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def tf32_attention(q, k, v, causal):
    """attention_reference with every matmul operand rounded to TF32: PyTorch's TF32 attention, emulated."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (tf32_rounded(q) @ tf32_rounded(k).transpose(-2, -1)) * scale
    if causal:
        T = q.shape[-2]
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return tf32_rounded(torch.softmax(scores, dim=-1)) @ tf32_rounded(v)


@pytest.mark.parametrize("D", [32, 64])
def test_tf32_dots_round_like_pytorchs(D, monkeypatch):
    """With TF32 allowed, fp32 attention rounds every dot operand to TF32: its output is as far from float64 as
    PyTorch's TF32 attention (emulated), by the FlashAttention rule, on GPU and in the interpreter alike."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    q, k, v = (randn(1, 2, 70, D, seed=s) for s in range(3))
    ours = flash_attention(q, k, v, causal=True)
    expected = attention_reference(q.double(), k.double(), v.double(), causal=True)
    ours_err, tf32_err = max_err(ours, expected), max_err(tf32_attention(q, k, v, True), expected)
    assert tf32_err > 1e-4  # TF32 precision, far from fp32's: the emulation is on
    assert ours_err <= 2 * tf32_err, f"error {ours_err:.3g} vs TF32's {tf32_err:.3g}"
