"""LayerNorm and RMSNorm over the last dimension, as Triton kernels.

    LayerNorm:  y = (x - mean) / sqrt(var + eps) * weight + bias
    RMSNorm:    y = x / sqrt(mean(x^2) + eps) * weight

One set of kernels serves both: RMSNorm is LayerNorm with the mean fixed at 0 and no bias. RMS is
a constexpr, so each mode compiles to its own kernel: under RMS the mean's reductions, loads and
stores are gone and x - 0 folds away, and the LayerNorm kernels compile as they would without it.

Forward: one program per row. When the row fits in one block (the usual GPT widths) it is loaded
once and kept in registers; wider rows are streamed in chunks, three passes (mean, centred
variance, output; RMSNorm skips the first), since a whole very wide row would not fit in registers.
Statistics are always fp32, whatever the input dtype, and mean and 1/std are saved for the backward
pass (RMSNorm saves only 1/rms).
(Under TRITON_INTERPRET=1, on CPU, the interpreter converts fp32 to bf16 by truncation, so bf16
outputs there can be a whole ulp off; a GPU rounds to nearest.)

Backward, for one row with xhat = (x - mean) * rstd (x * rstd for RMSNorm) and g = dy * weight:

    LayerNorm:  dx = rstd * (g - mean(g * xhat) * xhat - mean(g))
    RMSNorm:    dx = rstd * (g - mean(g * xhat) * xhat)
    dweight = sum over rows of dy * xhat,   dbias = sum over rows of dy

(the mean(g) term is the mean's own dependence on x, which RMSNorm does not have).
dx is per row, but dweight and dbias are sums over all rows. Rather than every row adding into
one shared vector (atomics or locks: a serialized bottleneck), each program takes a contiguous
group of rows, accumulates its own fp32 partial sums and writes them to a (groups, N) buffer, which
one more small kernel sums over groups into dweight and dbias in the parameters' dtype. Rows too wide for one block first get their row means in a
separate pass, after which a (groups, column chunks) grid computes dx and the partial sums.
"""
import functools
import math

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels.common import can_run_on, cuda_required_error
from kernels.tuning import launch, norm_configs, prune_norm_configs

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Widest row held in registers by one program. The backward keeps about five row-sized fp32
# vectors live (x, dy, weight and the two partial sums), so it gets a smaller cap than the forward:
# at 8192 it spills, as 16 warps leave each thread at most 128 registers (bench/compile_kernels.py).
_FWD_MAX_BLOCK_N = 16384
_BWD_MAX_BLOCK_N = 4096
# The final dweight/dbias reduction: 32 partial-sum rows of 128 columns per step (16 KiB of fp32).
_SUM_BLOCK_G, _SUM_BLOCK_N = 32, 128

# Each row kernel tunes its warps once per width, mode and dtype (kernels/tuning.py).
_autotune = triton.autotune(norm_configs(), key=["N", "RMS"],
                            prune_configs_by={"early_config_prune": prune_norm_configs})


@_autotune
@triton.jit
def _fwd_kernel(X, W, B, Y, Mean, Rstd, stride_x, stride_y, N, eps,
                RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2**31 for big activations
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = 0.0 if RMS else tl.sum(x, axis=0) / N
    # Padding lanes must not add (0 - mean)**2 to the variance.
    xc = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / N + eps)
    y = xc * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    if not RMS:
        tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@_autotune
@triton.jit
def _fwd_chunked_kernel(X, W, B, Y, Mean, Rstd, stride_x, stride_y, N, eps,
                        RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y_row = Y + row * stride_y
    if RMS:
        mean = 0.0
    else:
        # Per-lane accumulators, reduced once at the end: fewer cross-thread reductions and a more
        # accurate sum than adding each chunk's total into one scalar.
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            acc += tl.load(x_row + cols, mask=cols < N, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=0) / N
    # A second pass for the centred variance avoids the cancellation of E[x^2] - E[x]^2.
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        xc = tl.where(mask, x - mean, 0.0)
        acc += xc * xc
    rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    if not RMS:
        tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@_autotune
@triton.jit
def _bwd_kernel(X, W, DY, DX, Mean, Rstd, DW_partial, DB_partial,
                stride_x, stride_dy, stride_dx, M, N, rows_per_program,
                RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    group = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = group.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        # Padding lanes load dy = 0, which zeroes their share of every sum below.
        xhat = (x - (0.0 if RMS else tl.load(Mean + row))) * rstd
        g = dy * w
        c1 = tl.sum(g * xhat, axis=0) / N
        c2 = 0.0 if RMS else tl.sum(g, axis=0) / N
        dx = (g - (xhat * c1 + c2)) * rstd
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    partial = group.to(tl.int64) * N + cols
    tl.store(DW_partial + partial, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_partial + partial, db, mask=mask)


@_autotune
@triton.jit
def _bwd_row_means_kernel(X, W, DY, Mean, Rstd, C1, C2, stride_x, stride_dy, N,
                          RMS: tl.constexpr, BLOCK_N: tl.constexpr):
    # Wide rows only: the row means of g * xhat and g (RMSNorm: only the first), which every
    # column chunk of dx needs.
    row = tl.program_id(0).to(tl.int64)
    mean = 0.0 if RMS else tl.load(Mean + row)
    rstd = tl.load(Rstd + row)
    acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        acc1 += g * (x - mean) * rstd  # g = 0 on padding lanes
        acc2 += g
    tl.store(C1 + row, tl.sum(acc1, axis=0) / N)
    if not RMS:
        tl.store(C2 + row, tl.sum(acc2, axis=0) / N)


@_autotune
@triton.jit
def _bwd_chunked_kernel(X, W, DY, DX, Mean, Rstd, C1, C2, DW_partial, DB_partial,
                        stride_x, stride_dy, stride_dx, M, N, rows_per_program,
                        RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    group = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = group.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        xhat = (x - (0.0 if RMS else tl.load(Mean + row))) * rstd
        c1 = tl.load(C1 + row)
        c2 = 0.0 if RMS else tl.load(C2 + row)
        dx = (dy * w - (xhat * c1 + c2)) * rstd
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    partial = group.to(tl.int64) * N + cols
    tl.store(DW_partial + partial, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_partial + partial, db, mask=mask)


@triton.jit
def _sum_partials_kernel(DW_partial, DB_partial, DW, DB, groups, N,
                         HAS_BIAS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    """dweight (and dbias): the column sums of the (groups, N) fp32 partial sums, stored in the parameters'
    dtype; one launch for both, instead of a sum and a cast for each."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, groups, BLOCK_G):
        rows = start + tl.arange(0, BLOCK_G)
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        mask = (rows[:, None] < groups) & (cols[None, :] < N)
        dw += tl.sum(tl.load(DW_partial + offs, mask=mask, other=0.0), 0)
        if HAS_BIAS:
            db += tl.sum(tl.load(DB_partial + offs, mask=mask, other=0.0), 0)
    tl.store(DW + cols, dw.to(DW.dtype.element_ty), mask=cols < N)
    if HAS_BIAS:
        tl.store(DB + cols, db.to(DB.dtype.element_ty), mask=cols < N)


def _block(n, max_block):
    return min(triton.next_power_of_2(n), max_block)


def _launch(kernel, grid, warps, *args, **meta):
    """Launch an autotuned row kernel, or with `warps` that many warps instead of the tuned number."""
    launch(kernel, grid, None if warps is None else triton.Config({}, num_warps=warps), *args, **meta)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _row_groups(m, device):
    """(groups, rows per group) for the backward's partial dweight/dbias sums."""
    # A few programs per SM keeps the GPU busy while the (groups, N) buffer stays small. The
    # interpreter runs programs one after another, so there more groups only cost time.
    target = 4 * _sm_count(device.index or 0) if device.type == "cuda" else 4
    rows_per_group = triton.cdiv(m, min(m, target))
    return triton.cdiv(m, rows_per_group), rows_per_group


def _forward(x, weight, bias, eps, rms=False, warps=None):
    """y, and each row's fp32 mean (None for RMSNorm, which has none) and 1/std."""
    m, n = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    mean = None if rms else torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    block = _block(n, _FWD_MAX_BLOCK_N)
    kernel = _fwd_kernel if block >= n else _fwd_chunked_kernel
    # Pointers a launch never reads or writes (B without a bias, Mean under RMS) are filled with
    # another tensor of the launch.
    _launch(kernel, (m,), warps, x, weight, weight if bias is None else bias, y, rstd if rms else mean, rstd,
            x.stride(0), y.stride(0), n, eps, RMS=rms, HAS_BIAS=bias is not None, BLOCK_N=block)
    return y, mean, rstd


def _backward(dy, x, weight, mean, rstd, bias, warps=None):
    """dx in x's dtype, dweight and dbias (None without a bias) in the weight's and the bias's.

    mean is None for RMSNorm, as _forward returns it."""
    m, n = x.shape
    has_bias = bias is not None
    rms = mean is None
    mean = rstd if rms else mean  # never read under RMS, like C2: a filler for the pointer slot
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    groups, rows_per_group = _row_groups(m, x.device)
    dw_partial = torch.empty(groups, n, dtype=torch.float32, device=x.device)
    db_partial = torch.empty_like(dw_partial) if has_bias else dw_partial
    block = _block(n, _BWD_MAX_BLOCK_N)
    if block >= n:
        _launch(_bwd_kernel, (groups,), warps, x, weight, dy, dx, mean, rstd, dw_partial, db_partial,
                x.stride(0), dy.stride(0), dx.stride(0), m, n, rows_per_group,
                RMS=rms, HAS_BIAS=has_bias, BLOCK_N=block)
    else:
        c1 = torch.empty(m, dtype=torch.float32, device=x.device)
        c2 = c1 if rms else torch.empty(m, dtype=torch.float32, device=x.device)
        _launch(_bwd_row_means_kernel, (m,), warps, x, weight, dy, mean, rstd, c1, c2,
                x.stride(0), dy.stride(0), n, RMS=rms, BLOCK_N=block)
        _launch(_bwd_chunked_kernel, (groups, triton.cdiv(n, block)), warps,
                x, weight, dy, dx, mean, rstd, c1, c2, dw_partial, db_partial,
                x.stride(0), dy.stride(0), dx.stride(0), m, n, rows_per_group,
                RMS=rms, HAS_BIAS=has_bias, BLOCK_N=block)
    dweight = torch.empty_like(weight)
    dbias = None if bias is None else torch.empty_like(bias)
    _sum_partials_kernel[(triton.cdiv(n, _SUM_BLOCK_N),)](
        dw_partial, db_partial, dweight, dweight if dbias is None else dbias, groups, n,
        HAS_BIAS=has_bias, BLOCK_G=_SUM_BLOCK_G, BLOCK_N=_SUM_BLOCK_N, num_warps=4)
    return dx, dweight, dbias


def _as_rows(t, m, n):
    """t as an (m, n) matrix the kernels can address: unit column stride, any row stride."""
    t2 = t.reshape(m, n)  # a view whenever the layout allows, so contiguous inputs are not copied
    return t2 if t2.stride(1) == 1 else t2.contiguous()


class _NormFunction(torch.autograd.Function):
    """LayerNorm, or RMSNorm when rms (then bias is None)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms):
        n = x.shape[-1]
        m = math.prod(x.shape[:-1])
        x2 = _as_rows(x, m, n)
        if x2.numel() == 0:
            y = x2.new_empty(m, n)
            rstd = torch.empty(m, dtype=torch.float32, device=x.device)
            mean = None if rms else rstd
        else:
            y, mean, rstd = _forward(x2, weight, bias, eps, rms)
        ctx.save_for_backward(x2, weight, bias, mean, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x2, weight, bias, mean, rstd = ctx.saved_tensors
        m, n = x2.shape
        if x2.numel() == 0:
            dx = x2.new_empty(m, n)
            dweight = torch.zeros_like(weight)
            dbias = None if bias is None else torch.zeros_like(bias)
        else:
            dx, dweight, dbias = _backward(_as_rows(dy, m, n), x2, weight, mean, rstd, bias)
        return dx.view(ctx.shape), dweight, dbias, None, None


def _check_inputs(fn, x, weight, bias):
    if x.dim() == 0:
        raise ValueError(f"{fn}: x is a 0-d tensor; give it at least one dimension to "
                         "normalize over")
    n = x.shape[-1]
    if weight is None:
        raise ValueError(f"{fn}: weight is required; pass torch.ones({n}) to only normalize")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype not in SUPPORTED_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
            raise ValueError(f"{fn}: {name} has dtype {t.dtype}, which is not supported; "
                             f"cast it to one of {names}")
        if name != "x" and tuple(t.shape) != (n,):
            raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)} but x's last "
                             f"dimension is {n}; pass a {name} of shape ({n},)")
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but x is on {x.device}; "
                             "move them to the same device")
    if not can_run_on(x.device):
        raise cuda_required_error("ln_impl", x.device.type, fallback="torch")


def layer_norm(x, weight, bias=None, eps=1e-5):
    """LayerNorm of x over its last dimension, N = x.shape[-1]; weight and bias have shape (N,).

    bias=None means no bias (nanoGPT's bias=False). Output has x's dtype; statistics are fp32;
    gradients for weight and bias come back in their own dtypes.
    """
    _check_inputs("layer_norm", x, weight, bias)
    return _NormFunction.apply(x, weight, bias, float(eps), False)


def rms_norm(x, weight, eps=1e-5):
    """RMSNorm of x over its last dimension, N = x.shape[-1]: x / sqrt(mean(x^2) + eps) * weight.

    torch.nn.functional.rms_norm(x, (N,), weight, eps), except that eps defaults to 1e-5 rather
    than the machine epsilon of x's dtype (0.0078 for bf16, which would make the result depend on
    the training precision). weight, of shape (N,), is required, as for layer_norm. Output has x's
    dtype; the statistic is fp32; weight's gradient comes back in weight's dtype.
    """
    _check_inputs("rms_norm", x, weight, None)
    return _NormFunction.apply(x, weight, None, float(eps), True)


def layer_norm_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether layer_norm and rms_norm run compiled (not interpreted) for this dtype and device."""
    return torch.device(device).type == "cuda" and dtype in SUPPORTED_DTYPES


def layer_norm_reference(x, weight, bias=None, eps=1e-5):
    """Plain PyTorch LayerNorm with the statistics written out, computed in x's dtype."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * weight
    return y if bias is None else y + bias


def rms_norm_reference(x, weight, eps=1e-5):
    """Plain PyTorch RMSNorm with the statistic written out, computed in x's dtype."""
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight
