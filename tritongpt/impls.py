"""Choosing attention, layer norm and training-loss implementations for a run: the one place that does it.

model.py runs what model.set_impl says; `auto` there is PyTorch's until choose_impls, called once at setup
(train.py: after the model is on its device, before torch.compile, which must trace the chosen code, and
before DDP/FSDP; sample.py too), picks. The static rule first: `auto` may take a Triton kernel only on CUDA
where it supports the shapes and dtype, and a forced 'triton' (or 'flex') where it cannot run is a clear
error. Then, for each part left at `auto` where the kernel could run, it checks that the kernel agrees with
PyTorch's, times both (forward + backward) on the run's shapes and keeps the faster: attention against SDPA
(PyTorch's choice of backend: cuDNN on an H100/H200 with torch 2.11), or FlexAttention for documents and
windows; layer norm against F.layer_norm; the fused linear cross-entropy against F.cross_entropy of the
lm_head's logits. Off CUDA `auto` stays PyTorch's unless measure=True (the tests do that, under Triton's
interpreter, with injected timings).
"""
import statistics
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.attention import SDPBackend

from model import GPT, PYTORCH_IMPLS, Impls, LayerNorm
from tritongpt.metrics import wall_ms
from tritongpt.ops import AttentionMask, attention, document_bounds, kernels_module

# timer(name, fn) -> milliseconds that fn takes; name is the candidate, e.g. "attn_impl=triton" or
# "ln_impl=torch", so that tests can answer per candidate without relying on the order of the calls.
Timer = Callable[[str, Callable[[], None]], float]

# The kernel agrees when, for the output and every gradient, its largest error against a float64
# computation is at most TOLERANCE_FACTOR times PyTorch's own error in the same dtype, plus FLOOR_ULPS
# units of the dtype's precision at the tensor's scale (PyTorch's error can be near zero, e.g. in float32).
TOLERANCE_FACTOR = 4.0
FLOOR_ULPS = 8.0
# The attention check runs on one sequence and at most this many heads: every (sequence, head) is computed
# alike, and the float64 reference (SDPA's math path) materializes a T x T score matrix per head.
CHECK_HEADS = 4


def static_choice(model: GPT, device: torch.device, dtype: torch.dtype) -> Impls:
    """The requested implementations with `auto` resolved without measuring: a Triton kernel on CUDA where it
    supports the head size and dtype, PyTorch's otherwise. A forced kernel where it cannot run is an error."""
    head_dim = model.config.n_embd // model.config.n_head
    cuda = device.type == "cuda"
    supported = {  # asked only on CUDA, so that a CPU-only user never imports Triton
        "attn_impl": lambda: kernels_module().flash_attention_supported(head_dim, dtype, device),
        "ln_impl": lambda: kernels_module().layer_norm_supported(dtype, device),
        "ce_impl": lambda: kernels_module().can_run_on(device),
    }
    chosen = []
    for option, requested, pytorch in zip(supported, model.requested, PYTORCH_IMPLS):
        if requested == "auto":
            requested = "triton" if cuda and supported[option]() else pytorch
        elif requested == "triton" and not kernels_module().can_run_on(device):
            raise kernels_module().cuda_required_error(option, device.type, pytorch)
        elif requested == "flex" and not cuda:
            raise ValueError(f"attn_impl='flex' (FlexAttention) trains on CUDA only: PyTorch has no backward for it "
                             f"on {device.type}; use attn_impl='sdpa' there")
        chosen.append(requested)
    return Impls(*chosen)


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> str:
    """The backend F.scaled_dot_product_attention picks for these inputs ('cudnn_attention', 'flash_attention',
    'efficient_attention', 'math'), by PyTorch's own choice function; 'unknown' if that private function is
    not there."""
    try:
        return SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, causal)).name.lower()
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return "unknown"


def choose_impls(model: GPT, batch_size: int, device: torch.device | str, dtype: torch.dtype, *,
                 ln_dtype: torch.dtype | None = None, measure: bool | None = None,
                 timer: Timer | None = None, log: Callable[[str], None] = print) -> tuple[str, str]:
    """Set (model.set_impl) and return the (attention, layer norm) implementations for this run.

    dtype: the dtype attention computes in (autocast's, or the parameters'). ln_dtype: the dtype layer
    norm's input has; default the model's parameter dtype, which the residual stream keeps under autocast
    (under FSDP mixed precision, pass its param_dtype). measure: time `auto` choices; None means only on
    CUDA where the kernel supports the shapes and dtype. timer: see Timer; default CUDA events (or the
    wall clock off CUDA), a warm-up then the median of a few repetitions. Under torch.distributed, rank 0
    measures and logs, and every rank applies its choice.
    """
    device = torch.device(device)
    # The static rule first, on every rank: it validates forced choices (a clear error for 'triton' where
    # the kernels cannot run) and says where `auto` would take the kernel.
    attn, ln, ce = static_choice(model, device, dtype)
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        try:
            timer = timer or make_timer(device)
            if _should_measure(model.requested.attn, attn, measure):
                attn = _choose_attention(model, batch_size, device, dtype, timer, log)
            if _should_measure(model.requested.ln, ln, measure):
                ln_dtype = ln_dtype or _layer_norm(model).weight.dtype
                ln = _choose_layer_norm(model, batch_size, device, ln_dtype, timer, log)
            if _should_measure(model.requested.ce, ce, measure):
                ce = _choose_cross_entropy(model, batch_size, device, dtype, timer, log)
        except BaseException:
            if distributed:  # tell the other ranks, which would otherwise wait in the broadcast below
                dist.broadcast_object_list([None, None, None], src=0)
            raise
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()  # hand the measurement's memory back before the run allocates
    if distributed:  # every rank must run the same code: DDP and FSDP expect identical graphs
        choice = [attn, ln, ce]
        dist.broadcast_object_list(choice, src=0)
        if choice[0] is None:
            raise RuntimeError("rank 0 failed while choosing attn_impl/ln_impl/ce_impl (see its error)")
        attn, ln, ce = choice
    model.set_impl(attn, ln, ce)
    return attn, ln


def _should_measure(requested: str, static: str, measure: bool | None) -> bool:
    if requested != "auto":
        return False
    # The static rule gives 'triton' for `auto` exactly on CUDA with the kernel supported.
    return measure if measure is not None else static == "triton"


def make_timer(device: torch.device, warmup: int = 3, repeats: int = 10) -> Timer:
    """Median milliseconds of `repeats` calls after `warmup` (the kernels compiled in the agreement check
    already). On a GPU at GPT-2's shapes that is well under a second per candidate."""

    def cuda_timer(name: str, fn: Callable[[], None]) -> float:
        for _ in range(warmup):
            fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        torch.cuda.synchronize(device)  # so the warm-up's queued work is not timed
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(start.elapsed_time(end) for start, end in events)

    def wall_timer(name: str, fn: Callable[[], None]) -> float:
        return wall_ms(fn, device, runs=repeats, warmup=warmup)

    return cuda_timer if device.type == "cuda" else wall_timer


# -----------------------------------------------------------------------------
# Attention and layer norm, each: the inputs the run will see, the two candidates, check, time, choose


def _choose_attention(model: GPT, batch_size: int, device: torch.device, dtype: torch.dtype, timer: Timer,
                      log: Callable[[str], None]) -> str:
    cfg = model.config
    B, H, T, D = batch_size, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head
    # A private generator: measuring leaves the run's random streams (dropout, sampling) as they were.
    gen = torch.Generator(device=device).manual_seed(0)
    # q, k, v laid out as the model gives them: views of c_attn's (B, T, 3, H, D) output.
    qkv = torch.randn(B, T, 3, H, D, device=device, dtype=dtype, generator=gen)
    q, k, v = (t.requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
    # The gradient arrives as the backward of y.transpose(1, 2).contiguous(): (B, T, H, D) memory.
    grad = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=gen).transpose(1, 2)

    mask = _run_mask(model, B, T, device)
    # PyTorch's best for the run: SDPA (its choice of backend: cuDNN on an H100/H200 with torch 2.11), or
    # FlexAttention on CUDA for documents and windows, which SDPA's fast backends cannot take
    fallback = "flex" if mask is not None and device.type == "cuda" else "sdpa"

    def pytorch(q, k, v):  # no dropout in either: outputs with dropout could not be compared
        return attention(q, k, v, fallback, 0.0, _rows(mask, q.size(0)))

    def triton(q, k, v):
        return attention(q, k, v, "triton", 0.0, _rows(mask, q.size(0)))

    # the check's slice keeps the full tensors' strides
    check = tuple(t.detach()[:1, :CHECK_HEADS].requires_grad_() for t in (q, k, v))
    if mask is None:
        shapes = f"B={B} H={H} T={T} D={D} {_name(dtype)}, sdpa's backend {sdpa_backend(q, k, v, True)}"
    else:
        shapes = f"B={B} H={H} T={T} D={D} {_name(dtype)}, documents of T/4 and window {mask.window or 'none'}"
    return _choose("attn_impl", fallback, pytorch, triton, inputs=(q, k, v), grad=grad,
                   check_inputs=check, check_grad=grad[:1, :CHECK_HEADS], names=("output", "dq", "dk", "dv"),
                   eps=_attention_eps(dtype, device), shapes=shapes, timer=timer, log=log)


def _run_mask(model: GPT, batch: int, T: int, device: torch.device) -> AttentionMask | None:
    """The run's documents and window, for measuring: documents of a quarter of block_size each (the data's
    own lengths are not known yet), rows starting mid-document as random windows of a stream do."""
    cfg = model.config
    if cfg.doc_token < 0 and not cfg.attn_window:
        return None
    starts = ends = None
    if cfg.doc_token >= 0:
        tokens = torch.zeros(batch, T, dtype=torch.long, device=device)
        tokens[:, max(1, T // 8)::max(1, T // 4)] = 1
        starts, ends = document_bounds(tokens, 1)
    return AttentionMask(starts, ends, cfg.attn_window)


def _rows(mask: AttentionMask | None, batch: int) -> AttentionMask | None:
    """The mask for the first `batch` rows (the agreement check runs on one)."""
    if mask is None or mask.starts is None:
        return mask
    return AttentionMask(mask.starts[:batch], mask.ends[:batch], mask.window)


def _attention_eps(dtype: torch.dtype, device: torch.device) -> float:
    # In float32 the kernel's dots run in TF32 when torch allows it for its own matmuls (as train.py does).
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return 2.0**-10
    return torch.finfo(dtype).eps


def _layer_norm(model: GPT) -> LayerNorm:
    return next(m for m in model.modules() if isinstance(m, LayerNorm))


def _choose_layer_norm(model: GPT, batch_size: int, device: torch.device, dtype: torch.dtype, timer: Timer,
                       log: Callable[[str], None]) -> str:
    T = model.config.block_size
    ln = _layer_norm(model)
    C, has_bias = ln.weight.numel(), ln.bias is not None
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch_size, T, C, device=device, dtype=dtype, generator=gen)
    # The model's own weight and bias start as ones and zeros, which would hide a kernel that ignored
    # them: take their shape and presence, with values away from that.
    weight = 1 + 0.1 * torch.randn(C, device=device, dtype=dtype, generator=gen)
    bias = 0.1 * torch.randn(C, device=device, dtype=dtype, generator=gen) if has_bias else None
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias) if t is not None)
    grad = torch.randn(batch_size, T, C, device=device, dtype=dtype, generator=gen)

    def torch_ln(x, weight, bias=None):
        return F.layer_norm(x, (C,), weight, bias, 1e-5)

    def triton(x, weight, bias=None):
        return kernels_module().layer_norm(x, weight, bias, 1e-5)

    names = ("output", "dx", "dweight", "dbias")[: 1 + len(inputs)]
    shapes = f"x {batch_size}x{T}x{C}{'' if has_bias else ' no bias'} {_name(dtype)}"
    # checked on the full shapes: no T x T reference here, and the weight gradients sum over all rows
    return _choose("ln_impl", "torch", torch_ln, triton, inputs=inputs, grad=grad, check_inputs=inputs,
                   check_grad=grad, names=names, eps=torch.finfo(dtype).eps, shapes=shapes, timer=timer, log=log)


def _choose_cross_entropy(model: GPT, batch_size: int, device: torch.device, dtype: torch.dtype, timer: Timer,
                          log: Callable[[str], None]) -> str:
    cfg = model.config
    rows, C, V, cap = batch_size * cfg.block_size, cfg.n_embd, cfg.vocab_size, cfg.logit_softcap
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, C, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (0.02 * torch.randn(V, C, device=device, dtype=dtype, generator=gen)).requires_grad_()
    targets = torch.randint(0, V, (rows,), device=device, generator=gen)
    check_rows = min(rows, 256)  # the float64 reference holds check_rows x V logits

    def torch_ce(x, weight):
        return kernels_module().linear_cross_entropy_reference(x, weight, targets[: x.size(0)], cap)

    def triton(x, weight):
        return kernels_module().linear_cross_entropy(x, weight, targets[: x.size(0)], cap)

    check = (x.detach()[:check_rows].requires_grad_(), weight)
    shapes = f"{rows} rows x {C} -> vocab {V} {_name(dtype)}"
    return _choose("ce_impl", "torch", torch_ce, triton, inputs=(x, weight), grad=torch.ones((), device=device),
                   check_inputs=check, check_grad=torch.ones((), device=device), names=("loss", "dx", "dweight"),
                   eps=torch.finfo(dtype).eps, shapes=shapes, timer=timer, log=log)


def _choose(option: str, fallback: str, torch_fn: Callable, kernel_fn: Callable, *, inputs: tuple,
            grad: torch.Tensor, check_inputs: tuple, check_grad: torch.Tensor, names: tuple[str, ...], eps: float,
            shapes: str, timer: Timer, log: Callable[[str], None]) -> str:
    """Check kernel_fn against torch_fn (`names`: of the output and of each input's gradient) on check_inputs,
    then time both, forward + backward, on inputs; log and return the choice ('triton' or fallback)."""
    # not under the caller's autocast: the inputs are already in the run's dtype, the reference in float64
    with torch.autocast(inputs[0].device.type, enabled=False), torch.enable_grad():

        def run(fn):
            return lambda: torch.autograd.grad(fn(*inputs), inputs, grad)

        try:
            reason = _disagreement(names, kernel_fn, torch_fn, check_inputs, check_grad, eps, fallback)
            if reason is None:
                kernel_ms = timer(f"{option}=triton", run(kernel_fn))
        # e.g. no Triton, a launch this GPU cannot compile, out of memory: the run goes on with PyTorch's
        except Exception as error:  # noqa: BLE001
            reason = f"failed: {type(error).__name__}: {error}"
        if reason is not None:
            log(f"{option}=auto: triton {reason} ({shapes}) -> {fallback}")
            return fallback
        torch_ms = timer(f"{option}={fallback}", run(torch_fn))
    choice = "triton" if kernel_ms < torch_ms else fallback  # a tie keeps PyTorch's
    log(f"{option}=auto: triton {kernel_ms:.2f} ms, {fallback} {torch_ms:.2f} ms (forward+backward, {shapes}) "
        f"-> {choice}")
    return choice


def _disagreement(names, kernel_fn, torch_fn, inputs, grad, eps: float, fallback: str) -> str | None:
    """Why the kernel's output or gradients are not as close to float64's as PyTorch's, or None if they are."""

    def results(fn, inputs, grad):
        out = fn(*inputs)
        grads = torch.autograd.grad(out, inputs, grad.to(out.dtype), allow_unused=True)
        # an input the kernel ignored has no gradient: zeros, which the comparison then rejects
        return [out.detach(), *(torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads))]

    reference = results(torch_fn, [t.detach().double().requires_grad_() for t in inputs], grad.double())
    ours = results(kernel_fn, inputs, grad)
    theirs = results(torch_fn, inputs, grad)
    for name, a, b, ref in zip(names, ours, theirs, reference):
        err_ours = (a.double() - ref).abs().max().item()
        err_theirs = (b.double() - ref).abs().max().item()
        allowed = TOLERANCE_FACTOR * err_theirs + FLOOR_ULPS * eps * ref.abs().max().item()
        if not err_ours <= allowed:  # written so that NaN disagrees
            return (f"disagrees: its {name} is off by {err_ours:.3g} from float64, {fallback}'s by "
                    f"{err_theirs:.3g} (allowed {allowed:.3g})")
    return None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
