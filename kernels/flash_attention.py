"""FlashAttention-2 (forward and backward) in Triton.

Attention softmax(Q K^T * scale) V computed naively builds a T x T score matrix per head, so memory
grows as O(T^2) and the time goes into moving that matrix through HBM. FlashAttention instead keeps
one tile of queries in fast memory and streams the keys and values past it, maintaining a running
row maximum and row sum ("online softmax") so the tile's output can be rescaled as new keys arrive.
Nothing of size T x T is ever stored; the forward only saves the row logsumexp (base 2, see below).

The backward recomputes the probabilities tile by tile from Q, K and that logsumexp:
  P = exp(S - lse),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dQ = dS K,  dK = dS^T Q
with delta = rowsum(dO * O) precomputed by a small kernel. One kernel holds a key tile and streams
the queries past it, accumulating dK and dV, and adds each tile's share of dQ into an fp32 buffer with
atomics: 5 matmuls and 1 exponential per score tile. Under torch.use_deterministic_algorithms, dQ
instead gets a kernel of its own (holding a query tile, streaming the keys) that recomputes P: every
output tile then has one owner and the gradients repeat bit for bit, for 2 more matmuls and a second
exponential per tile (docs/kernels.md).

Tile sizes, warps and stages are autotuned per launch from the spaces in kernels/tuning.py.

Details:
- Scores are computed in base 2: softmax_scale * log2(e) is folded into one multiply so the kernels
  can use exp2, which is what the hardware provides; the saved logsumexp is base 2 as well. The forward
  takes the row max of the raw scores and applies the scale inside the exponent's fused multiply-add.
- Causal forward tiles run heaviest first (the last query tiles see the most keys).
- Causal attention skips the tiles above the diagonal through the loop bounds; only the tiles that
  straddle the diagonal (and the ragged last tile when T is not a multiple of the tile) are masked.
- Dropout draws Philox random numbers keyed by each score's global index (b, h, i, j), so the
  backward regenerates the forward's mask instead of storing it, whatever the tile sizes.
- Matmuls take fp16/bf16 tiles natively with fp32 accumulation; all other math is in fp32.
"""
import math

import torch
import triton
import triton.language as tl

from kernels.common import can_run_on, cuda_required_error, interpreter_enabled, round_to, tf32_operand
from kernels.tuning import (Tiles, attention_configs, attention_space, launch, sequence_bucket, target_arch,
                            tiles_config)

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_HEAD_DIM, _MAX_HEAD_DIM = 16, 128
_DELTA_ROWS = 64

# Autotuning: a launch tunes once per key (with the tensors' dtypes, which Triton adds) and each kernel's
# early_config_prune keeps the configurations of its own space (kernels/tuning.py).
_TUNING_KEY = ["BLOCK_D", "CAUSAL", "DOCS", "WINDOW", "DROPOUT", "PRECISION", "t_bucket"]


def _space(kernel, named_args, kwargs):
    tiles = attention_space(kernel, kwargs["BLOCK_D"], named_args["Q"].dtype, kwargs["DROPOUT"], target_arch(),
                            kwargs["PRECISION"] == "tf32")
    return {(t.held, t.streamed, t.warps, t.stages) for t in tiles}


def _keep(configs, space, held_name, streamed_name):
    return [c for c in configs if (c.kwargs[held_name], c.kwargs[streamed_name], c.num_warps, c.num_stages) in space]


def _prune_forward(configs, named_args, **kwargs):
    return _keep(configs, _space("forward", named_args, kwargs), "BLOCK_M", "BLOCK_N")


def _prune_dkdv(configs, named_args, **kwargs):
    kernel = "backward" if kwargs["ATOMIC_DQ"] else "deterministic"
    return _keep(configs, _space(kernel, named_args, kwargs), "BLOCK_N", "BLOCK_M")


def _prune_dq(configs, named_args, **kwargs):
    return _keep(configs, _space("deterministic", named_args, kwargs), "BLOCK_M", "BLOCK_N")


@triton.jit
def _head(base, b, h, stride_b, stride_h):
    """Where head h of batch b starts in a (B, H, ...) tensor; int64, as B*H*T*D can overflow int32."""
    return base + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def _dropout_keep(seed, bh, rows, cols, T, dropout_p):
    """Keep-mask for the scores at (rows, cols) of head bh; rows and cols broadcast against each other."""
    # The counter is the score's global index, so the mask does not depend on how the work is tiled.
    # It is built in int64 (B*H*T*T overflows int32 for long sequences) and fed to Philox as two
    # 32-bit words, which keeps Philox in fast 32-bit arithmetic.
    idx = (bh.to(tl.int64) * T + rows) * T + cols
    lo = idx.to(tl.uint32)  # truncates to the low word
    hi = (idx >> 32).to(tl.uint32)
    zero = tl.zeros_like(lo)
    r, _, _, _ = tl.philox(seed, lo, hi, zero, zero)
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _load_tile(ptr, rows, cols, stride_t, stride_d, T, D, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """A (rows, cols) tile, zero past T and D, as an operand of PRECISION's dots (see tf32_operand)."""
    tile = tl.load(ptr + rows[:, None] * stride_t + cols[None, :] * stride_d,
                   mask=(rows[:, None] < T) & (cols[None, :] < D), other=0.0)
    if UPCAST:  # the interpreter computes low-precision tl.dot wrongly
        tile = tile.to(tl.float32)
    return tf32_operand(tile, PRECISION)


@triton.jit
def _key_split(m0, T, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(split, end) for the query tile starting at m0: key tiles in [0, split) need no mask, those in
    [split, end) straddle the diagonal or the end of the sequence. Causal stops at the diagonal: later
    key tiles are fully masked and never visited."""
    if CAUSAL:
        split = m0
        end = tl.minimum(m0 + BLOCK_M, T)
    else:
        split = (T // BLOCK_N) * BLOCK_N
        end = T
    return split, end


@triton.jit
def _visible(rows, cols, T, starts, window, CAUSAL: tl.constexpr, DOCS: tl.constexpr, WINDOW: tl.constexpr):
    """Whether query `rows` sees key `cols`; they broadcast against each other, in either orientation
    (`starts`, the queries' document starts, like `rows`).

    Causal: keys up to the query's own position, which for a query before T also keeps out the keys
    past T. Otherwise: every key before T. Queries past T need no mask: they are never stored, and the
    backward zeroes their probabilities through lse = +inf. DOCS: only keys from the query's document
    start on; WINDOW: only the last `window` keys, the query's own included.
    """
    if CAUSAL:
        visible = cols <= rows
    else:
        visible = cols < T
    if DOCS:
        visible = visible & (cols >= starts)
    if WINDOW:
        visible = visible & (cols > rows - window)
    return visible


@triton.jit
def _first_key(row, start, window, DOCS: tl.constexpr, WINDOW: tl.constexpr):
    """The first key that the causal query `row` sees (its document starts at `start`)."""
    first = row * 0
    if DOCS:
        first = tl.maximum(first, start)
    if WINDOW:
        first = tl.maximum(first, row - window + 1)
    return first


@triton.jit
def _masked_key_range(m0, T, split, start_ptr, window, DOCS: tl.constexpr, WINDOW: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(lo, full) for the causal query tile at m0 under a document or window mask: no query of the tile
    sees the key tiles before lo, some see those in [lo, full), all see those in [full, split). Document
    starts and windows only grow along the rows, so the tile's first and last rows bound them all."""
    last = tl.minimum(m0 + BLOCK_M, T) - 1
    first_of_first = _first_key(m0, tl.load(start_ptr + m0) if DOCS else 0, window, DOCS, WINDOW)
    first_of_last = _first_key(last, tl.load(start_ptr + last) if DOCS else 0, window, DOCS, WINDOW)
    lo = (first_of_first // BLOCK_N) * BLOCK_N
    full = tl.minimum(tl.cdiv(first_of_last, BLOCK_N) * BLOCK_N, split)
    return lo, full


@triton.jit
def _masked_query_range(n0, T, end_ptr, window, DOCS: tl.constexpr, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full, hi) for the key tile at n0 under a document or window mask: the queries past the tile and
    before `full` see all its keys, those in [full, hi) some, later ones none (`end_ptr`: for each key,
    where the next document starts)."""
    last = tl.minimum(n0 + BLOCK_N, T) - 1
    full = T + n0 * 0
    hi = T + n0 * 0
    if DOCS:
        full = tl.minimum(full, tl.load(end_ptr + n0))
        hi = tl.minimum(hi, tl.load(end_ptr + last))
    if WINDOW:
        full = tl.minimum(full, n0 + window)
        hi = tl.minimum(hi, last + window)
    return full, hi


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, k_ptr, v_ptr, stride_kt, stride_kd, stride_vt, stride_vd,
               rows, starts, window, lo, hi, bh, T, D, qk_scale, seed, dropout_p,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOCS: tl.constexpr, WINDOW: tl.constexpr,
               DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_ptr, cols, offs_d, stride_kt, stride_kd, T, D, UPCAST, PRECISION)
        v = _load_tile(v_ptr, cols, offs_d, stride_vt, stride_vd, T, D, UPCAST, PRECISION)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # raw scores: the scale is folded in below
        if MASKED:
            s = tl.where(_visible(rows[:, None], cols[None, :], T, starts, window, CAUSAL, DOCS, WINDOW), s,
                         float("-inf"))
        # qk_scale > 0, so the row max of the raw scores, scaled, is that of the scaled scores, and each
        # score's exponent s * qk_scale - m is one fused multiply-add
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_ref = m_new
        if MASKED:
            if DOCS or WINDOW:  # a row may see no key yet (its document or window starts later): no NaN
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s * qk_scale - m_ref[:, None])
        # The normalizer sums the un-dropped probabilities: out = dropout(softmax(S)) V.
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, bh, rows[:, None], cols[None, :], T, dropout_p), p, 0.0)
        acc = tl.dot(tf32_operand(round_to(p, v_ptr, UPCAST), PRECISION), v, acc * alpha[:, None],
                     input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(attention_configs(("forward",), "BLOCK_M", "BLOCK_N"), key=_TUNING_KEY,
                 prune_configs_by={"early_config_prune": _prune_forward})
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                stride_vb, stride_vh, stride_vt, stride_vd, stride_ob, stride_oh, stride_ot, stride_od,
                H, T, D, qk_scale, SEED, dropout_p, keep_scale, t_bucket, DOC_START, window,
                CAUSAL: tl.constexpr, DOCS: tl.constexpr, WINDOW: tl.constexpr, DROPOUT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):
    if CAUSAL:  # the last query tiles see the most keys: launch them first, so the tail has the light ones
        m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    else:
        m0 = tl.program_id(0) * BLOCK_M
    h, b = tl.program_id(1), tl.program_id(2)
    bh = b * H + h
    seed = tl.load(SEED) if DROPOUT else 0  # SEED is None without dropout
    # int64 offsets: b * stride_b alone can exceed 2^31 elements for large batches.
    q_ptr = _head(Q, b, h, stride_qb, stride_qh)
    k_ptr = _head(K, b, h, stride_kb, stride_kh)
    v_ptr = _head(V, b, h, stride_vb, stride_vh)
    o_ptr = _head(O, b, h, stride_ob, stride_oh)
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_ptr, rows, offs_d, stride_qt, stride_qd, T, D, UPCAST, PRECISION)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    start_ptr = DOC_START + b.to(tl.int64) * T if DOCS else DOC_START  # None without documents
    starts = tl.load(start_ptr + rows, mask=rows < T, other=0)[:, None] if DOCS else 0
    split, end = _key_split(m0, T, CAUSAL, BLOCK_M, BLOCK_N)
    first_unmasked = 0
    if DOCS or WINDOW:  # key tiles before lo are never visited; [lo, first_unmasked) are partly visible
        lo, first_unmasked = _masked_key_range(m0, T, split, start_ptr, window, DOCS, WINDOW, BLOCK_M, BLOCK_N)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_ptr, v_ptr, stride_kt, stride_kd, stride_vt, stride_vd,
                                   rows, starts, window, lo, first_unmasked, bh, T, D, qk_scale, seed, dropout_p,
                                   True, CAUSAL, DOCS, WINDOW, DROPOUT, BLOCK_N, BLOCK_D, UPCAST, PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_ptr, v_ptr, stride_kt, stride_kd, stride_vt, stride_vd,
                               rows, starts, window, first_unmasked, split, bh, T, D, qk_scale, seed, dropout_p,
                               False, CAUSAL, DOCS, WINDOW, DROPOUT, BLOCK_N, BLOCK_D, UPCAST, PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_ptr, v_ptr, stride_kt, stride_kd, stride_vt, stride_vd,
                               rows, starts, window, split, end, bh, T, D, qk_scale, seed, dropout_p,
                               True, CAUSAL, DOCS, WINDOW, DROPOUT, BLOCK_N, BLOCK_D, UPCAST, PRECISION)

    if DOCS or WINDOW:  # a padding row past T may see no key: keep it finite (it is never stored)
        l_i = tl.where(rows < T, l_i, 1.0)
    out = acc * (keep_scale / l_i)[:, None]
    tl.store(o_ptr + rows[:, None] * stride_ot + offs_d[None, :] * stride_od,
             round_to(out, O, UPCAST).to(O.dtype.element_ty),
             mask=(rows[:, None] < T) & (offs_d[None, :] < D))
    tl.store(LSE + bh.to(tl.int64) * T + rows, m_i + tl.log2(l_i), mask=rows < T)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_od,
                      stride_dob, stride_doh, stride_dot, stride_dod, H, T, D,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    h, b = tl.program_id(1), tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(_head(O, b, h, stride_ob, stride_oh),
                   rows, offs_d, stride_ot, stride_od, T, D, True, "ieee")
    do = _load_tile(_head(DO, b, h, stride_dob, stride_doh),
                    rows, offs_d, stride_dot, stride_dod, T, D, True, "ieee")
    tl.store(DELTA + (b * H + h).to(tl.int64) * T + rows, tl.sum(o * do, 1), mask=rows < T)


@triton.jit
def _bwd_dkdv_tiles(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, start_ptr, stride_qt, stride_qd,
                    stride_dot, stride_dod, cols, window, lo, hi, bh, T, D, softmax_scale, qk_scale, seed, dropout_p,
                    keep_scale, MASKED: tl.constexpr, DOCS: tl.constexpr, WINDOW: tl.constexpr,
                    DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # Everything is computed transposed (keys along dim 0) so dK and dV accumulate without transposes.
    offs_d = tl.arange(0, BLOCK_D)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_ptr, rows, offs_d, stride_qt, stride_qd, T, D, UPCAST, PRECISION)
        do = _load_tile(do_ptr, rows, offs_d, stride_dot, stride_dod, T, D, UPCAST, PRECISION)
        # lse = +inf zeroes the probabilities of the padding rows past T.
        lse = tl.load(lse_ptr + rows, mask=rows < T, other=float("inf"))
        delta = tl.load(delta_ptr + rows, mask=rows < T, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        if MASKED:  # the causal diagonal band, and the edges of documents and windows
            starts = tl.load(start_ptr + rows, mask=rows < T, other=0)[None, :] if DOCS else 0
            p_t = tl.where(_visible(rows[None, :], cols[:, None], T, starts, window, True, DOCS, WINDOW), p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if DROPOUT:
            keep_t = _dropout_keep(seed, bh, rows[None, :], cols[:, None], T, dropout_p)
            dv = tl.dot(tf32_operand(round_to(tl.where(keep_t, p_t * keep_scale, 0.0), do_ptr, UPCAST), PRECISION),
                        do, dv, input_precision=PRECISION)
            dp_t = tl.where(keep_t, dp_t * keep_scale, 0.0)
        else:
            dv = tl.dot(tf32_operand(round_to(p_t, do_ptr, UPCAST), PRECISION), do, dv, input_precision=PRECISION)
        ds_t = tf32_operand(round_to(p_t * (dp_t - delta[None, :]), q_ptr, UPCAST), PRECISION)
        dk = tl.dot(ds_t, q, dk, input_precision=PRECISION)
        if ATOMIC_DQ:  # this key tile's share of dQ = dS K, added into fp32 dQ (padding keys have k = 0)
            dq = tl.dot(tl.trans(ds_t), k, input_precision=PRECISION) * softmax_scale
            tl.atomic_add(dq_ptr + rows[:, None] * D + offs_d[None, :], dq,
                          mask=(rows[:, None] < T) & (offs_d[None, :] < D), sem="relaxed")
    return dk, dv


# One kernel for both backward designs: the one-pass one adds dQ into DQ_ACC, which autotuning's trial
# launches must find zeroed.
@triton.autotune(attention_configs(("backward", "deterministic"), "BLOCK_N", "BLOCK_M"),
                 key=_TUNING_KEY + ["ATOMIC_DQ"], reset_to_zero=["DQ_ACC"],
                 prune_configs_by={"early_config_prune": _prune_dkdv})
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, DQ_ACC, LSE, DELTA,
                     stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                     stride_vb, stride_vh, stride_vt, stride_vd, stride_dob, stride_doh, stride_dot, stride_dod,
                     stride_gb, stride_gh, stride_gt, stride_gd,
                     H, T, D, softmax_scale, qk_scale, SEED, dropout_p, keep_scale, t_bucket, DOC_START, DOC_END,
                     window, CAUSAL: tl.constexpr, DOCS: tl.constexpr, WINDOW: tl.constexpr, DROPOUT: tl.constexpr,
                     ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    h, b = tl.program_id(1), tl.program_id(2)
    bh = b * H + h
    seed = tl.load(SEED) if DROPOUT else 0  # SEED is None without dropout
    q_ptr = _head(Q, b, h, stride_qb, stride_qh)
    do_ptr = _head(DO, b, h, stride_dob, stride_doh)
    lse_ptr = LSE + bh.to(tl.int64) * T
    delta_ptr = DELTA + bh.to(tl.int64) * T
    dq_ptr = DQ_ACC + bh.to(tl.int64) * T * D  # contiguous (B, H, T, D) fp32, read only with ATOMIC_DQ
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(_head(K, b, h, stride_kb, stride_kh),
                   cols, offs_d, stride_kt, stride_kd, T, D, UPCAST, PRECISION)
    v = _load_tile(_head(V, b, h, stride_vb, stride_vh),
                   cols, offs_d, stride_vt, stride_vd, T, D, UPCAST, PRECISION)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    start_ptr = DOC_START + b.to(tl.int64) * T if DOCS else DOC_START  # None without documents
    # Keys past T are never stored, so only the causal diagonal needs a mask. Causal: queries before
    # n0 cannot see this key tile, the query tiles in [n0, n0 + BLOCK_N) straddle the diagonal, and
    # every later query sees the whole tile, but for documents and windows: those end, and the queries
    # past their end see none of it.
    if CAUSAL:
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, start_ptr, stride_qt,
                                 stride_qd, stride_dot, stride_dod, cols, window, n0, tl.minimum(n0 + BLOCK_N, T),
                                 bh, T, D, softmax_scale, qk_scale, seed, dropout_p, keep_scale,
                                 True, DOCS, WINDOW, DROPOUT, ATOMIC_DQ, BLOCK_M, BLOCK_D, UPCAST, PRECISION)
        first_unmasked = n0 + BLOCK_N
    else:
        first_unmasked = 0
    unmasked_end = T
    if DOCS or WINDOW:
        end_ptr = DOC_END + b.to(tl.int64) * T if DOCS else DOC_END
        full, hi = _masked_query_range(n0, T, end_ptr, window, DOCS, WINDOW, BLOCK_N)
        unmasked_end = first_unmasked + tl.maximum(full - first_unmasked, 0) // BLOCK_M * BLOCK_M
    dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, start_ptr, stride_qt,
                             stride_qd, stride_dot, stride_dod, cols, window, first_unmasked, unmasked_end, bh, T, D,
                             softmax_scale, qk_scale, seed, dropout_p, keep_scale,
                             False, DOCS, WINDOW, DROPOUT, ATOMIC_DQ, BLOCK_M, BLOCK_D, UPCAST, PRECISION)
    if DOCS or WINDOW:  # the queries that see part of the tile; later ones are never visited
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, start_ptr, stride_qt,
                                 stride_qd, stride_dot, stride_dod, cols, window, unmasked_end, hi, bh, T, D,
                                 softmax_scale, qk_scale, seed, dropout_p, keep_scale,
                                 True, DOCS, WINDOW, DROPOUT, ATOMIC_DQ, BLOCK_M, BLOCK_D, UPCAST, PRECISION)

    # dK and dV share one layout (stride_g*), chosen by the launcher.
    mask = (cols[:, None] < T) & (offs_d[None, :] < D)
    offs = (b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
            + cols[:, None] * stride_gt + offs_d[None, :] * stride_gd)
    tl.store(DK + offs, round_to(dk * softmax_scale, DK, UPCAST).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + offs, round_to(dv, DV, UPCAST).to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, stride_kt, stride_kd, stride_vt, stride_vd,
                  rows, starts, window, lo, hi, bh, T, D, qk_scale, seed, dropout_p, keep_scale,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOCS: tl.constexpr, WINDOW: tl.constexpr,
                  DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                  PRECISION: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_ptr, cols, offs_d, stride_kt, stride_kd, T, D, UPCAST, PRECISION)
        v = _load_tile(v_ptr, cols, offs_d, stride_vt, stride_vd, T, D, UPCAST, PRECISION)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(_visible(rows[:, None], cols[None, :], T, starts, window, CAUSAL, DOCS, WINDOW), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            dp = tl.where(_dropout_keep(seed, bh, rows[:, None], cols[None, :], T, dropout_p), dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(tf32_operand(round_to(ds, k_ptr, UPCAST), PRECISION), k, dq, input_precision=PRECISION)
    return dq


@triton.autotune(attention_configs(("deterministic",), "BLOCK_M", "BLOCK_N"), key=_TUNING_KEY,
                 prune_configs_by={"early_config_prune": _prune_dq})
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA,
                   stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                   stride_vb, stride_vh, stride_vt, stride_vd, stride_dob, stride_doh, stride_dot, stride_dod,
                   stride_gb, stride_gh, stride_gt, stride_gd,
                   H, T, D, softmax_scale, qk_scale, SEED, dropout_p, keep_scale, t_bucket, DOC_START, DOC_END,
                   window, CAUSAL: tl.constexpr, DOCS: tl.constexpr, WINDOW: tl.constexpr, DROPOUT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                   PRECISION: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    h, b = tl.program_id(1), tl.program_id(2)
    bh = b * H + h
    seed = tl.load(SEED) if DROPOUT else 0  # SEED is None without dropout
    k_ptr = _head(K, b, h, stride_kb, stride_kh)
    v_ptr = _head(V, b, h, stride_vb, stride_vh)
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(_head(Q, b, h, stride_qb, stride_qh),
                   rows, offs_d, stride_qt, stride_qd, T, D, UPCAST, PRECISION)
    do = _load_tile(_head(DO, b, h, stride_dob, stride_doh),
                    rows, offs_d, stride_dot, stride_dod, T, D, UPCAST, PRECISION)
    lse = tl.load(LSE + bh.to(tl.int64) * T + rows, mask=rows < T, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    start_ptr = DOC_START + b.to(tl.int64) * T if DOCS else DOC_START  # None without documents
    starts = tl.load(start_ptr + rows, mask=rows < T, other=0)[:, None] if DOCS else 0
    split, end = _key_split(m0, T, CAUSAL, BLOCK_M, BLOCK_N)
    first_unmasked = 0
    if DOCS or WINDOW:  # as in the forward
        lo, first_unmasked = _masked_key_range(m0, T, split, start_ptr, window, DOCS, WINDOW, BLOCK_M, BLOCK_N)
        dq = _bwd_dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, stride_kt, stride_kd, stride_vt, stride_vd,
                           rows, starts, window, lo, first_unmasked, bh, T, D, qk_scale, seed, dropout_p, keep_scale,
                           True, CAUSAL, DOCS, WINDOW, DROPOUT, BLOCK_N, BLOCK_D, UPCAST, PRECISION)
    dq = _bwd_dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, stride_kt, stride_kd, stride_vt, stride_vd,
                       rows, starts, window, first_unmasked, split, bh, T, D, qk_scale, seed, dropout_p, keep_scale,
                       False, CAUSAL, DOCS, WINDOW, DROPOUT, BLOCK_N, BLOCK_D, UPCAST, PRECISION)
    dq = _bwd_dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, stride_kt, stride_kd, stride_vt, stride_vd,
                       rows, starts, window, split, end, bh, T, D, qk_scale, seed, dropout_p, keep_scale,
                       True, CAUSAL, DOCS, WINDOW, DROPOUT, BLOCK_N, BLOCK_D, UPCAST, PRECISION)
    tl.store(_head(DQ, b, h, stride_gb, stride_gh)
             + rows[:, None] * stride_gt + offs_d[None, :] * stride_gd,
             round_to(dq * softmax_scale, DQ, UPCAST).to(DQ.dtype.element_ty),
             mask=(rows[:, None] < T) & (offs_d[None, :] < D))


def _dot_precision(dtype):
    # Only fp32 tiles are affected: like torch's own matmuls they use TF32 only when torch allows it.
    if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _bthd_like(x):
    """Empty (B, H, T, D) tensor stored as (B, T, H, D): merging heads afterwards is then free."""
    B, H, T, D = x.shape
    return torch.empty(B, T, H, D, dtype=x.dtype, device=x.device).transpose(1, 2)


def _block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def _launch(kernel, grid, tiles, held_name, streamed_name, *args, **meta):
    """Launch an autotuned kernel, or with `tiles` that tiling instead of the tuned one."""
    launch(kernel, grid, None if tiles is None else tiles_config(tiles, held_name, streamed_name), *args, **meta)


def _mask_meta(starts, window):
    """The kernels' mask switches: documents given, and a window."""
    return dict(DOCS=starts is not None, WINDOW=window > 0)


def _forward(q, k, v, causal, softmax_scale, dropout_p, seed, starts, window, tiles: Tiles | None = None):
    B, H, T, D = q.shape
    out = _bthd_like(q)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    _launch(_fwd_kernel, lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), H, B), tiles, "BLOCK_M", "BLOCK_N",
            q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            H, T, D, softmax_scale * math.log2(math.e), seed, dropout_p, 1.0 / (1.0 - dropout_p), sequence_bucket(T),
            starts, window, CAUSAL=causal, **_mask_meta(starts, window), DROPOUT=dropout_p > 0, BLOCK_D=_block_d(D),
            UPCAST=interpreter_enabled() and q.dtype != torch.float32, PRECISION=_dot_precision(q.dtype))
    return out, lse


def _backward(do, q, k, v, out, lse, causal, softmax_scale, dropout_p, seed, starts, ends, window,
              deterministic: bool, tiles: Tiles | None = None):
    """dq, dk, dv. The one-pass design: one kernel per key tile computes dK and dV and adds its share of dQ
    into an fp32 buffer with atomics (5 matmuls and 1 exponential per score tile), then one cast. Atomics
    add in whatever order the programs finish, so dQ's last bits vary run to run; deterministic: a second
    kernel per query tile recomputes the scores and owns dQ (7 matmuls and 2 exponentials, bit-exact)."""
    B, H, T, D = q.shape
    block_d = _block_d(D)
    delta = torch.empty_like(lse)
    _bwd_delta_kernel[(triton.cdiv(T, _DELTA_ROWS), H, B)](
        out, do, delta, *out.stride(), *do.stride(), H, T, D, BLOCK_M=_DELTA_ROWS, BLOCK_D=block_d)
    dq, dk, dv = _bthd_like(q), _bthd_like(q), _bthd_like(q)
    dq_acc = dq if deterministic else torch.zeros(B, H, T, D, dtype=torch.float32, device=q.device)
    args = (H, T, D, softmax_scale, softmax_scale * math.log2(math.e), seed, dropout_p, 1.0 / (1.0 - dropout_p),
            sequence_bucket(T), starts, ends, window)
    meta = dict(CAUSAL=causal, **_mask_meta(starts, window), DROPOUT=dropout_p > 0, BLOCK_D=block_d,
                UPCAST=interpreter_enabled() and q.dtype != torch.float32, PRECISION=_dot_precision(q.dtype))
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride())
    _launch(_bwd_dkdv_kernel, lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), H, B), tiles, "BLOCK_N", "BLOCK_M",
            q, k, v, do, dk, dv, dq_acc, lse, delta, *strides, *args, ATOMIC_DQ=not deterministic, **meta)
    if deterministic:
        _launch(_bwd_dq_kernel, lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), H, B), tiles, "BLOCK_M", "BLOCK_N",
                q, k, v, do, dq, lse, delta, *strides, *args, **meta)
    else:
        dq.copy_(dq_acc)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, dropout_p, softmax_scale, seed, starts, ends, window, deterministic, tiles):
        forward_tiles, ctx.backward_tiles = tiles
        out, lse = _forward(q, k, v, causal, softmax_scale, dropout_p, seed, starts, window, forward_tiles)
        ctx.save_for_backward(q, k, v, out, lse, seed, starts, ends)
        ctx.causal, ctx.dropout_p, ctx.softmax_scale, ctx.window = causal, dropout_p, softmax_scale, window
        ctx.deterministic = deterministic
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, seed, starts, ends = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, out, lse, ctx.causal, ctx.softmax_scale, ctx.dropout_p, seed, starts,
                               ends, ctx.window, ctx.deterministic, ctx.backward_tiles)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


def _seed_tensor(seed, device):
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed={seed!r} must be an int in [0, 2**63), or None to draw one")
    return torch.tensor([seed], dtype=torch.int64, device=device)


def _document_bounds(documents, q, causal):
    """documents as the kernels take them, int32 and contiguous, after checking them against q."""
    if documents is None:
        return None, None
    if not causal:
        raise ValueError("documents restrict causal attention: pass causal=True with them")
    B, _, T, _ = q.shape
    if not (isinstance(documents, tuple) and len(documents) == 2):
        raise ValueError("documents must be a pair (starts, ends) of (B, T) tensors: where each position's document "
                         "starts and where the next one starts")
    checked = []
    for name, bounds in zip(("starts", "ends"), documents):
        if not isinstance(bounds, torch.Tensor) or bounds.shape != (B, T) or bounds.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"documents' {name} must be an integer tensor of shape (B, T) = {(B, T)}, got "
                             f"{getattr(bounds, 'dtype', type(bounds).__name__)} {tuple(getattr(bounds, 'shape', ()))}")
        if bounds.device != q.device:
            raise ValueError(f"documents' {name} are on {bounds.device}, q on {q.device}; move them to one device")
        checked.append(bounds.to(torch.int32).contiguous())
    return tuple(checked)


def _check_inputs(q, k, v, dropout_p, softmax_scale=None):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected 4 dims (B, H, T, D), "
                             "e.g. x.view(B, T, H, D).transpose(1, 2)")
    if not q.shape == k.shape == v.shape:
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}; they must "
                         "all be (B, H, T, D) with the same T (for fewer kv heads, repeat k and v per query head)")
    if q.numel() == 0:
        raise ValueError(f"q, k, v are empty (shape {tuple(q.shape)}); B, H, T and D must all be >= 1")
    D = q.shape[-1]
    if not _MIN_HEAD_DIM <= D <= _MAX_HEAD_DIM:
        raise ValueError(f"head dim D={D} is outside the supported {_MIN_HEAD_DIM}..{_MAX_HEAD_DIM}; "
                         "use attn_impl='sdpa'")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtypes q={q.dtype}, k={k.dtype}, v={v.dtype}: all three must be the same, "
                         "one of float16, bfloat16 or float32 (cast them, or use attn_impl='sdpa')")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device}); move them to one")
    if not can_run_on(q.device):
        raise cuda_required_error("attn_impl", q.device.type, fallback="sdpa")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p} must be in [0, 1); use 0.0 to disable dropout")
    if softmax_scale is not None and not softmax_scale > 0:
        raise ValueError(f"softmax_scale={softmax_scale} must be > 0 (None: 1/sqrt(head dim))")


def flash_attention(q, k, v, causal=True, dropout_p=0.0, softmax_scale=None, *, documents=None, window: int = 0,
                    seed=None, deterministic: bool | None = None, tiles: tuple[Tiles, Tiles] | None = None):
    """softmax(q k^T * softmax_scale) v with FlashAttention-2 kernels, like F.scaled_dot_product_attention.

    q, k, v: (B, H, T, D), any strides, fp16/bf16/fp32, 16 <= D <= 128. causal: query i attends to keys
    j <= i. softmax_scale defaults to 1/sqrt(D). dropout_p drops attention probabilities (after the
    softmax) with Philox numbers derived from `seed` (an int); None draws one on q's device, from the
    generator that torch.manual_seed seeds: no host sync, and nothing for torch.compile to break its
    graph on, as the kernels read the seed from device memory. Returns (B, H, T, D),
    stored as (B, T, H, D) so that `out.transpose(1, 2).reshape(B, T, H * D)` does not copy.
    documents: (starts, ends), two (B, T) integer tensors for packed sequences: each row holds documents one
    after the other, and position t's document spans [starts[b, t], ends[b, t]); a query then sees only
    the keys of its own document. window: a query sees only the last `window` keys, its own included
    (0: all). Both need causal; the key tiles they leave empty are never loaded.
    deterministic: the backward's design (see _backward): None follows
    torch.use_deterministic_algorithms, True gives bit-identical gradients run to run, False the faster
    one-pass kernel whose dQ is summed with atomics.
    tiles: (forward, backward) Tiles to launch with instead of the autotuned ones (tests run every tiling
    of the GPU's spaces in the interpreter with it).
    """
    _check_inputs(q, k, v, dropout_p, softmax_scale)
    starts, ends = _document_bounds(documents, q, causal)
    if not isinstance(window, int) or window < 0 or (window and not causal):
        raise ValueError(f"window={window!r} must be an int >= 0 (0: no window), and > 0 only with causal=True")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    if dropout_p == 0.0:
        seed_tensor = None  # the kernels draw no random numbers; leave the generator alone
    elif seed is None:
        seed_tensor = torch.randint(0, 2**31 - 1, (1,), device=q.device)
    else:
        seed_tensor = _seed_tensor(seed, q.device)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return _FlashAttention.apply(q, k, v, bool(causal), float(dropout_p), float(softmax_scale), seed_tensor, starts,
                                 ends, window, bool(deterministic), tiles or (None, None))


def flash_attention_supported(head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether flash_attention runs natively here: CUDA, a supported dtype and 16 <= head_dim <= 128.

    False on CPU even under TRITON_INTERPRET=1: the interpreter is for tests, far too slow to train with.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
        return False
    return dtype in _SUPPORTED_DTYPES and _MIN_HEAD_DIM <= head_dim <= _MAX_HEAD_DIM


def attention_reference(q, k, v, causal, softmax_scale=None, dropout_mask=None, dropout_p=0.0):
    """Plain PyTorch attention with an explicit softmax, in the inputs' dtype (tests run it in float64).

    dropout_mask: optional (B, H, T, T) bool keep-mask; kept probabilities are scaled by 1/(1 - dropout_p).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        T = q.shape[-2]
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    return probs @ v
