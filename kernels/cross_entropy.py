"""Fused linear cross-entropy: the mean cross-entropy of `x @ weight.T` (the lm_head's logits) and its
gradients for x and weight, without ever holding the (rows, vocab) logits (Liger-Kernel's idea).

The rows go in chunks. For a chunk, one matmul makes its logits (rows_in_chunk, vocab); a Triton kernel,
one program per row, then walks the row in vocabulary tiles twice: first an online max and sum of
exponentials (the logsumexp, and so the row's loss), then the gradient of the mean loss for each logit,
softmax minus the one-hot target, divided by the number of counted rows, written over the logit it came
from. Two more matmuls turn that into the chunk's share of the gradients for x and weight. The chunk is
sized so its logits take about as much memory as x itself: for GPT-2 (768 wide, vocab 50304) and 32k
rows in bf16, the logits F.cross_entropy(lm_head(x)) holds are 3.3 GB (and as much again for their
gradient); here one chunk of 512 rows, 52 MB.

Targets of `ignore_index` (-1) count for nothing; with every target ignored the loss is nan and the
gradients zero, as F.cross_entropy. A logit softcap c (logits = c * tanh(logits / c)) is applied inside
the kernel, its derivative (1 - tanh^2) too. The gradients are computed in the forward pass (they cost
the same matmuls again otherwise) and the backward scales them by the upstream gradient.
"""
import math

import torch
import triton
import triton.language as tl

from kernels.common import can_run_on, cuda_required_error, interpreter_enabled, round_to
from kernels.tuning import cross_entropy_configs, launch, prune_cross_entropy_configs


@triton.jit
def _capped(z, cap, SOFTCAP: tl.constexpr):
    """c * tanh(z / c), with tanh from exp (exact at both ends: exp overflows to inf, or underflows to 0)."""
    if SOFTCAP:
        z = cap * (1.0 - 2.0 / (tl.exp(2.0 * z / cap) + 1.0))
    return z


# The vocabulary tile and warps are tuned once per vocabulary size; the kernel writes over its input, so
# autotuning's trial launches restore the logits after each one.
@triton.autotune(cross_entropy_configs(), key=["n_cols", "SOFTCAP"], restore_value=["LOGITS"],
                 prune_configs_by={"early_config_prune": prune_cross_entropy_configs})
@triton.jit
def _ce_kernel(LOGITS, stride_row, TARGETS, LOSS, INV_COUNT, n_cols, ignore_index, cap,
               SOFTCAP: tl.constexpr, BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits = LOGITS + row * stride_row
    target = tl.load(TARGETS + row)
    counted = target != ignore_index
    m = float("-inf")
    s = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = _capped(tl.load(logits + cols, mask=cols < n_cols, other=0.0).to(tl.float32), cap, SOFTCAP)
        z = tl.where(cols < n_cols, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    safe_target = tl.where(counted, target, 0)
    z_target = _capped(tl.load(logits + safe_target).to(tl.float32), cap, SOFTCAP)
    tl.store(LOSS + row, tl.where(counted, lse - z_target, 0.0))
    scale = tl.where(counted, tl.load(INV_COUNT), 0.0)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = _capped(tl.load(logits + cols, mask=mask, other=0.0).to(tl.float32), cap, SOFTCAP)
        grad = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
        if SOFTCAP:
            grad = grad * (1.0 - (z / cap) * (z / cap))
        tl.store(logits + cols, round_to(grad * scale, LOGITS, UPCAST).to(LOGITS.dtype.element_ty), mask=mask)


def chunk_rows(n_rows: int, width: int, vocab: int) -> int:
    """Rows per chunk: a chunk's logits (rows x vocab) about as large as x (n_rows x width)."""
    return max(1, triton.next_power_of_2(math.ceil(n_rows / math.ceil(vocab / width))))


def loss_and_logit_grads(logits: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor, inv_count: torch.Tensor,
                         cap: float, ignore_index: int, config: tuple[int, int] | None = None) -> None:
    """The kernel over a chunk: each row's loss into `losses`, and over `logits` (rows, vocab) the gradient
    of the mean loss (inv_count: 1 / the number of counted rows, a 1-element tensor). config: a
    (vocabulary tile, warps) pair to launch with instead of the tuned one."""
    args = (logits, logits.stride(0), targets, losses, inv_count, logits.size(1), ignore_index, cap)
    meta = dict(SOFTCAP=cap > 0, UPCAST=interpreter_enabled())
    forced = None if config is None else triton.Config({"BLOCK": config[0]}, num_warps=config[1])
    launch(_ce_kernel, (logits.size(0),), forced, *args, **meta)


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, cap, ignore_index):
        n_rows, width = x.shape
        vocab = weight.size(0)
        counted = (targets != ignore_index).sum()
        inv_count = (1.0 / counted.float()).reshape(1)  # inf when nothing counts: the loss is then 0 * inf = nan
        losses = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:  # summed over the chunks in fp32
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
        step = chunk_rows(n_rows, width, vocab)
        for start in range(0, n_rows, step):
            end = min(start + step, n_rows)
            x_chunk = x[start:end]
            logits = x_chunk @ weight.T  # becomes the gradient of the loss for these logits, in place
            loss_and_logit_grads(logits, targets[start:end], losses[start:end], inv_count, cap, ignore_index)
            if grad_x is not None:
                torch.matmul(logits, weight, out=grad_x[start:end])
            if grad_weight is not None:
                grad_weight += (logits.T @ x_chunk).float()
        ctx.save_for_backward(grad_x, grad_weight)
        ctx.weight_dtype = weight.dtype
        return losses.sum() * inv_count[0]

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        if grad_x is not None:
            grad_x = grad_x * grad_loss.to(grad_x.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_x, grad_weight, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float = 0.0,
                         ignore_index: int = -1) -> torch.Tensor:
    """mean(cross_entropy(softcap(x @ weight.T), targets)) over the rows whose target is not ignore_index,
    for x (..., width), weight (vocab, width) and targets (...). Under autocast x and weight are cast to
    its dtype, as the lm_head's matmul would be."""
    if not can_run_on(x.device):
        raise cuda_required_error("ce_impl", x.device.type, "torch")
    if softcap < 0:
        raise ValueError(f"softcap must be 0 (off) or positive, got {softcap}")
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return LinearCrossEntropy.apply(x.reshape(-1, x.size(-1)).contiguous(), weight.contiguous(),
                                        targets.reshape(-1).contiguous(), float(softcap), ignore_index)


def linear_cross_entropy_reference(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   softcap: float = 0.0, ignore_index: int = -1) -> torch.Tensor:
    """The same loss in plain PyTorch, holding every logit."""
    logits = x.reshape(-1, x.size(-1)) @ weight.T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.float() if logits.element_size() < 4 else logits  # fp32 (or float64) for the softmax
    return torch.nn.functional.cross_entropy(logits, targets.reshape(-1), ignore_index=ignore_index)
