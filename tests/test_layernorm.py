"""Tests for kernels/layernorm.py: LayerNorm, with and without a bias, and RMSNorm.

Without a GPU the kernels run in Triton's interpreter (see conftest.py), so shapes here stay small:
few rows for the wide widths. Tests marked gpu cover the big shapes on a real device.
"""
from typing import Callable, NamedTuple

import pytest
import torch
import torch.nn.functional as F

from conftest import KERNEL_DEVICE
from kernels import common
from kernels import layernorm as ln
from kernels.layernorm import (layer_norm, layer_norm_reference, layer_norm_supported, rms_norm,
                               rms_norm_reference)

NAMES = ("y", "dx", "dweight", "dbias")

# (leading shape, width): ranks 1 to 3; widths 1, 2, odd, GPT-2 small and XL, one over 4096, and
# one past the forward's single-block cap (16384), so the chunked forward and backward both run.
CASES = [
    ((), 1), ((4,), 1), ((3,), 2), ((2, 3), 37), ((), 768), ((2, 5), 768),
    ((4,), 1600), ((2,), 5000), ((2,), 20000),
]


def _inputs(lead, n, dtype, bias, device=KERNEL_DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    # An offset mean and a non-unit scale, so a kernel that skips centring or scaling is caught.
    x = torch.randn(*lead, n, generator=g) * 3 + 1.5
    w = torch.randn(n, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    dy = torch.randn(*lead, n, generator=g)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), cast(dy)


def _run(fn, x, w, b, dy, **kw):
    """Output and gradients of fn for x, weight and (if given) bias, all detached."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
    y = fn(*leaves, **kw)
    grads = torch.autograd.grad(y, leaves, dy)
    return [y.detach(), *grads]


def _torch_layer_norm(x, w, b=None, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _torch_rms_norm(x, w, eps=1e-5):
    # eps given: F.rms_norm's own default is the machine epsilon of x's dtype.
    return F.rms_norm(x, (x.shape[-1],), w, eps)


class Norm(NamedTuple):
    ours: Callable
    reference: Callable
    torch: Callable
    bias: bool


# The tests that cover both norms run LayerNorm with and without a bias, and RMSNorm (no bias).
NORMS = {
    "bias": Norm(layer_norm, layer_norm_reference, _torch_layer_norm, bias=True),
    "nobias": Norm(layer_norm, layer_norm_reference, _torch_layer_norm, bias=False),
    "rms": Norm(rms_norm, rms_norm_reference, _torch_rms_norm, bias=False),
}
MODES = list(NORMS)


def _reference(x, w, b, dy, mode="bias", **kw):
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    return _run(NORMS[mode].reference, f64(x), f64(w), f64(b), f64(dy), **kw)


def _max_err(a, ref):
    return (a.double() - ref).abs().max().item() if ref.numel() else 0.0


def _assert_fp32_close(ours, ref):
    for name, a, r in zip(NAMES, ours, ref):
        assert a.shape == r.shape, name
        tol = 1e-5 * max(1.0, r.abs().max().item() if r.numel() else 0.0)
        assert _max_err(a, r) <= tol, f"{name}: error {_max_err(a, r):.3g} > {tol:.3g}"


def _bf16_truncation_error(ref):
    """Error of cutting ref to bf16 by dropping mantissa bits, as Triton's interpreter does."""
    bits = ref.float().view(torch.int32) & ~0xFFFF
    return _max_err(bits.view(torch.float32), ref)


def _assert_low_precision_close(ours, ref, inputs, dtype, mode="bias"):
    # FlashAttention's rule: at most twice the error PyTorch itself makes in this dtype. On CPU,
    # F.layer_norm and F.rms_norm in fp16/bf16 compute internally in fp32 and only round the result,
    # so their error is about the rounding of the exact answer to the dtype; take the larger of the
    # two so the baseline is never below what any correct fp16/bf16 result can reach. The small absolute
    # term covers exact results (width 1: y == bias, dx == 0), where both baselines are 0.
    # Triton's interpreter converts fp32 to bf16 by truncation (a GPU rounds to nearest), which
    # alone can cost a whole bf16 ulp, so under the interpreter that is the bf16 baseline.
    interpreted = ours[0].device.type != "cuda"
    theirs = _run(NORMS[mode].torch, *inputs)
    for name, a, t, r in zip(NAMES, ours, theirs, ref):
        assert a.dtype == t.dtype and a.shape == r.shape, name
        baseline = max(_max_err(t, r), _max_err(r.to(dtype), r))
        if interpreted and dtype == torch.bfloat16 and r.numel():
            baseline = max(baseline, _bf16_truncation_error(r))
        tol = 2 * baseline + 1e-6 * max(1.0, r.abs().max().item())
        assert _max_err(a, r) <= tol, f"{name}: error {_max_err(a, r):.3g} > {tol:.3g}"


def _check(mode, inputs, dtype=torch.float32, **kw):
    """Our result against the float64 reference, to the tolerance for dtype."""
    ours, ref = _run(NORMS[mode].ours, *inputs, **kw), _reference(*inputs, mode=mode, **kw)
    assert len(ours) == len(ref) == (4 if NORMS[mode].bias else 3)
    assert ours[0].dtype == dtype
    if dtype == torch.float32:
        _assert_fp32_close(ours, ref)
    else:
        _assert_low_precision_close(ours, ref, inputs, dtype, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("lead,n", CASES, ids=[f"{lead}x{n}" for lead, n in CASES])
def test_matches_reference(lead, n, dtype, mode):
    _check(mode, _inputs(lead, n, dtype, NORMS[mode].bias), dtype)


class _LaunchCounter:
    """Stands in for a kernel and counts its launches, to check which code path ran."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _count_launches(monkeypatch):
    names = ["_fwd_kernel", "_fwd_chunked_kernel", "_bwd_kernel", "_bwd_row_means_kernel",
             "_bwd_chunked_kernel", "_sum_partials_kernel"]
    counters = {name: _LaunchCounter(getattr(ln, name)) for name in names}
    for name, counter in counters.items():
        monkeypatch.setattr(ln, name, counter)
    return counters


@pytest.mark.parametrize("mode", ["bias", "rms"])
@pytest.mark.parametrize("n,kernels", [
    # the weight and bias gradients come out of one last launch whatever the width, already cast
    (4000, ["_fwd_kernel", "_bwd_kernel", "_sum_partials_kernel"]),
    # between the backward and forward caps
    (5000, ["_fwd_kernel", "_bwd_row_means_kernel", "_bwd_chunked_kernel", "_sum_partials_kernel"]),
    (20000, ["_fwd_chunked_kernel", "_bwd_row_means_kernel", "_bwd_chunked_kernel", "_sum_partials_kernel"]),
])
def test_block_cap_picks_kernel(monkeypatch, n, kernels, mode):
    counters = _count_launches(monkeypatch)
    _check(mode, _inputs((2,), n, torch.float32, NORMS[mode].bias))
    assert {name: c.launches for name, c in counters.items() if c.launches} == dict.fromkeys(kernels, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [64, 100, 33])  # chunks that divide the row, and a ragged last one
def test_chunked_path_with_small_caps(monkeypatch, n, mode, dtype):
    # Shrinking the caps runs the chunked kernels over many chunks at widths the interpreter
    # handles quickly.
    monkeypatch.setattr(ln, "_FWD_MAX_BLOCK_N", 32)
    monkeypatch.setattr(ln, "_BWD_MAX_BLOCK_N", 16)
    counters = _count_launches(monkeypatch)
    _check(mode, _inputs((7,), n, dtype, NORMS[mode].bias), dtype)
    assert counters["_fwd_chunked_kernel"].launches == 1
    assert counters["_bwd_chunked_kernel"].launches == 1


@pytest.mark.parametrize("mode", ["bias", "rms"])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 13, 17])
def test_row_groups_cover_all_rows(m, mode):
    # Also check the row-group split directly: every row in exactly one group, none empty.
    groups, rows_per_group = ln._row_groups(m, torch.device(KERNEL_DEVICE))
    assert 1 <= groups <= m
    assert (groups - 1) * rows_per_group < m <= groups * rows_per_group
    _check(mode, _inputs((m,), 37, torch.float32, NORMS[mode].bias, seed=m))


def _non_contiguous_views(n):
    g = torch.Generator().manual_seed(1)
    rand = lambda *s: torch.randn(*s, generator=g).to(KERNEL_DEVICE)  # noqa: E731
    return {
        "transposed": rand(n, 6).t(),  # last dim not unit stride: needs a copy
        "column_slice": rand(6, n + 5)[:, :n],  # padded rows: a view the kernels can address
        "permuted_3d": rand(3, 2, n).transpose(0, 1),  # rows not evenly spaced: needs a copy
        "row_step": rand(12, n)[::2],
    }


@pytest.mark.parametrize("mode", ["bias", "rms"])
@pytest.mark.parametrize("layout", list(_non_contiguous_views(8)))
def test_non_contiguous_input(layout, mode):
    x = _non_contiguous_views(40)[layout]
    assert not x.is_contiguous()
    _, w, b, dy = _inputs(x.shape[:-1], 40, torch.float32, NORMS[mode].bias)
    _check(mode, (x, w, b, dy))


@pytest.mark.parametrize("mode", ["bias", "rms"])
def test_non_contiguous_grad_output(mode):
    # y.sum().backward() hands the backward an expanded dy whose strides are all zero.
    x, w, b, _ = _inputs((5,), 24, torch.float32, NORMS[mode].bias)
    dy = torch.ones((), device=KERNEL_DEVICE).expand(5, 24)
    assert dy.stride() == (0, 0)
    _check(mode, (x, w, b, dy))


def test_contiguous_input_is_not_copied_and_stats_are_fp32():
    x, w, b, _ = _inputs((2, 3), 16, torch.bfloat16, bias=True)
    x.requires_grad_()
    y = layer_norm(x, w, b)
    saved_x, _, _, mean, rstd = y.grad_fn.saved_tensors
    assert saved_x.data_ptr() == x.data_ptr()
    assert mean.dtype == rstd.dtype == torch.float32
    assert mean.shape == rstd.shape == (6,)
    xd = x.detach().double().reshape(6, 16)
    torch.testing.assert_close(mean.double(), xd.mean(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(rstd.double(), (xd.var(-1, unbiased=False) + 1e-5).rsqrt(),
                               rtol=1e-5, atol=0)


def test_rms_saves_no_mean():
    x, w, _, _ = _inputs((2, 3), 16, torch.bfloat16, bias=False)
    x.requires_grad_()
    y = rms_norm(x, w, eps=1e-3)
    saved_x, _, bias, mean, rstd = y.grad_fn.saved_tensors
    assert saved_x.data_ptr() == x.data_ptr()
    assert bias is None and mean is None
    assert rstd.dtype == torch.float32 and rstd.shape == (6,)
    xd = x.detach().double().reshape(6, 16)
    torch.testing.assert_close(rstd.double(), (xd.square().mean(-1) + 1e-3).rsqrt(),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("mode", ["bias", "rms"])
@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16), (3, 0)])
def test_empty_input(shape, mode):
    x = torch.randn(shape, device=KERNEL_DEVICE, requires_grad=True)
    w = torch.randn(shape[-1], device=KERNEL_DEVICE, requires_grad=True)
    b = torch.randn(shape[-1], device=KERNEL_DEVICE, requires_grad=True) if mode == "bias" else None
    y = NORMS[mode].ours(*[t for t in (x, w, b) if t is not None])
    assert y.shape == shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == shape
    assert torch.equal(w.grad, torch.zeros_like(w))
    assert b is None or torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("mode", ["bias", "rms"])
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32),
                                             (torch.float32, torch.bfloat16)])
def test_mixed_dtypes(x_dtype, w_dtype, mode):
    x, _, _, dy = _inputs((4,), 48, x_dtype, bias=False)
    _, w, b, _ = _inputs((4,), 48, w_dtype, NORMS[mode].bias)
    ours = _run(NORMS[mode].ours, x, w, b, dy)
    dtypes = (x_dtype, x_dtype, w_dtype, w_dtype)
    assert tuple(t.dtype for t in ours) == dtypes[:len(ours)]
    for name, a, r in zip(NAMES, ours, _reference(x, w, b, dy, mode)):
        # Loose: only one rounding to bf16 separates these from the fp64 reference.
        assert _max_err(a, r) <= 2e-2 * max(1.0, r.abs().max().item()), name


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("eps", [1e-5, 1e-1])
def test_eps_and_constant_rows(eps, mode):
    # A constant row has zero variance (a zero row, zero mean square), so the result rests on eps
    # alone (and must not be NaN).
    x, w, b, dy = _inputs((4,), 32, torch.float32, NORMS[mode].bias)
    x[1] = 2.0
    x[2] = x[2] * 1e-3
    x[3] = 0.0
    ours = _run(NORMS[mode].ours, x, w, b, dy, eps=eps)
    assert all(torch.isfinite(t).all() for t in ours)
    _check(mode, (x, w, b, dy), eps=eps)


def test_reference_matches_torch():
    x, w, b, _ = _inputs((3, 5), 37, torch.float64, bias=True, device="cpu")
    torch.testing.assert_close(layer_norm_reference(x, w, b), _torch_layer_norm(x, w, b))
    torch.testing.assert_close(layer_norm_reference(x, w), _torch_layer_norm(x, w, None))
    for eps in (1e-5, 1e-1):
        torch.testing.assert_close(rms_norm_reference(x, w, eps), _torch_rms_norm(x, w, eps))


@pytest.mark.parametrize("mode", MODES)
def test_weight_without_grad(mode):
    # A frozen weight (and bias): no gradient for it and no error; dx as before.
    x, w, b, dy = _inputs((3, 4), 40, torch.float32, NORMS[mode].bias)
    x.requires_grad_()
    NORMS[mode].ours(*[t for t in (x, w, b) if t is not None]).backward(dy)
    assert w.grad is None and (b is None or b.grad is None)
    torch.testing.assert_close(x.grad, _run(NORMS[mode].ours, x, w, b, dy)[1], rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_accumulate(mode):
    # Two backward passes add into .grad, on top of what was there, in each leaf's dtype.
    x, w, b, dy = _inputs((2, 3), 24, torch.float32, NORMS[mode].bias)
    w = w.bfloat16()
    leaves = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]
    for t in leaves:
        t.grad = torch.ones_like(t)
    for _ in range(2):
        NORMS[mode].ours(*leaves).backward(dy)
    for name, t, g in zip(("dx", "dweight", "dbias"), leaves, _run(NORMS[mode].ours, x, w, b, dy)[1:]):
        assert t.grad.dtype == t.dtype, name
        torch.testing.assert_close(t.grad, torch.ones_like(g) + g + g, msg=name)


def _bad_inputs():
    x = torch.randn(4, 8, device=KERNEL_DEVICE)
    w = torch.randn(8, device=KERNEL_DEVICE)
    return [
        ((x, torch.randn(9, device=KERNEL_DEVICE)), r"weight has shape \(9,\).*shape \(8,\)"),
        ((x, w[None]), r"weight has shape \(1, 8\)"),
        ((x, w, torch.randn(4, device=KERNEL_DEVICE)), r"bias has shape \(4,\).*shape \(8,\)"),
        ((x.double(), w), r"x has dtype torch.float64.*cast it to one of float32"),
        ((x.to(torch.int32), w), r"x has dtype torch.int32"),
        ((x, w.double()), r"weight has dtype torch.float64"),
        ((x, w, w.double()), r"bias has dtype torch.float64"),
        ((x[0, 0], w), r"0-d tensor"),
        ((x, None), r"weight is required; pass torch.ones\(8\)"),
        ((x, w.to("meta")), r"weight is on meta but x is on"),
    ]


@pytest.mark.parametrize("args,match", _bad_inputs())
def test_bad_inputs_raise(args, match):
    with pytest.raises(ValueError, match=f"^layer_norm: .*{match}"):
        layer_norm(*args)


@pytest.mark.parametrize("args,match", [(a, m) for a, m in _bad_inputs() if len(a) == 2])
def test_rms_bad_inputs_raise(args, match):
    with pytest.raises(ValueError, match=f"^rms_norm: .*{match}"):
        rms_norm(*args)


@pytest.mark.parametrize("fn", [layer_norm, rms_norm])
def test_cpu_without_interpreter_raises(monkeypatch, fn):
    monkeypatch.setattr(common, "_INTERPRET", False)
    with pytest.raises(ValueError, match=r"ln_impl='triton' needs a CUDA GPU, but the tensors are on cpu; "
                                         r"use ln_impl='torch', or set TRITON_INTERPRET=1"):
        fn(torch.randn(2, 8), torch.ones(8))


def test_layer_norm_supported():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert layer_norm_supported(dtype, torch.device("cuda"))
        assert layer_norm_supported(dtype, torch.device("cuda:0"))
        # Never on CPU, not even under the interpreter: 'auto' must not pick the slow path.
        assert not layer_norm_supported(dtype, torch.device("cpu"))
    assert not layer_norm_supported(torch.float64, torch.device("cuda"))
    assert not layer_norm_supported(torch.int64, torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["bias", "rms"])
@pytest.mark.parametrize("m,n", [(4096, 16384), (64, 65536), (8192, 12288)])
def test_gpu_large_bf16(m, n, mode):
    _check(mode, _inputs((m,), n, torch.bfloat16, NORMS[mode].bias, device="cuda"), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["nobias", "rms"])
@pytest.mark.parametrize("m,n", [(32768, 768), (3000, 1600), (257, 5000)])
def test_gpu_fp32_many_rows(m, n, mode):
    # Far more rows than row groups (a few per SM), so each program sums many rows.
    _check(mode, _inputs((m,), n, torch.float32, NORMS[mode].bias, device="cuda"))
