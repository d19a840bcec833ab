"""The implementations the model can run, picked at run time and never stored in a checkpoint: attention
`eager` (explicit masked softmax: what people write by hand), `sdpa` (F.scaled_dot_product_attention) or
`triton` (our flash attention kernel) or `flex` (PyTorch's FlexAttention, compiled on CUDA, for documents
and windows); layer norm `torch` or `triton` (our fused kernel); the training loss
`torch` (F.cross_entropy of the logits) or `triton` (the fused linear cross-entropy). `auto` takes
PyTorch's off CUDA and, on CUDA, the Triton kernels where they support the shape and dtype; select_impl.py
then times both on the run's shapes.
"""
import functools

import torch
from torch.nn.attention import SDPBackend

ATTN_IMPLS = ("auto", "eager", "sdpa", "triton", "flex")
LN_IMPLS = ("auto", "torch", "triton")
CE_IMPLS = ("auto", "torch", "triton")


def kernels_module():
    """Import kernels/ on first use, so CPU-only users never need Triton."""
    try:
        import kernels
    except ImportError as error:
        raise RuntimeError(
            f"the Triton kernels could not be imported ({error}); install triton (pip install triton) "
            "or use attn_impl='sdpa' and ln_impl='torch'"
        ) from error
    return kernels


def check_impl(name: str, value: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ValueError(f"{name} must be one of {valid}, got {value!r}")
    return value


def resolve_attn_impl(attn_impl: str, head_dim: int, dtype: torch.dtype, device: torch.device) -> str:
    """The attention implementation to run for a requested one: 'auto' becomes 'triton' on CUDA where the
    kernel supports the head size and dtype, 'sdpa' otherwise; 'triton' where it cannot run is an error."""
    if attn_impl == "auto":
        supported = device.type == "cuda" and kernels_module().flash_attention_supported(head_dim, dtype, device)
        return "triton" if supported else "sdpa"
    if attn_impl == "triton" and not kernels_module().can_run_on(device):
        raise kernels_module().cuda_required_error("attn_impl", device.type, "sdpa")
    if attn_impl == "flex" and device.type != "cuda":
        raise ValueError(f"attn_impl='flex' (FlexAttention) trains on CUDA only: PyTorch has no backward for it on "
                         f"{device.type}; use attn_impl='sdpa' there")
    return attn_impl


def resolve_ln_impl(ln_impl: str, dtype: torch.dtype, device: torch.device) -> str:
    """As resolve_attn_impl, for layer norm ('torch' or 'triton')."""
    if ln_impl == "auto":
        supported = device.type == "cuda" and kernels_module().layer_norm_supported(dtype, device)
        return "triton" if supported else "torch"
    if ln_impl == "triton" and not kernels_module().can_run_on(device):
        raise kernels_module().cuda_required_error("ln_impl", device.type, "torch")
    return ln_impl


def resolve_ce_impl(ce_impl: str, device: torch.device) -> str:
    """As resolve_attn_impl, for the training loss: 'torch' (F.cross_entropy of the lm_head's logits) or
    'triton' (the fused linear cross-entropy, which never holds the logits)."""
    if ce_impl == "auto":
        return "triton" if device.type == "cuda" and kernels_module().can_run_on(device) else "torch"
    if ce_impl == "triton" and not kernels_module().can_run_on(device):
        raise kernels_module().cuda_required_error("ce_impl", device.type, "torch")
    return ce_impl


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> str:
    """The backend F.scaled_dot_product_attention picks for these inputs ('cudnn_attention', 'flash_attention',
    'efficient_attention', 'math'), by PyTorch's own choice function; 'unknown' if that private function is
    not there."""
    try:
        return SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, causal)).name.lower()
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return "unknown"


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor | None,
                   window: int) -> torch.Tensor:
    """Causal attention over (B, H, T, D) through FlexAttention with a block mask: a query sees the keys of
    its document (from starts[b, t], (B, T), when given) and, with a window, its last `window` keys. Compiled
    on CUDA (its fused kernel skips the empty blocks), eager elsewhere (forward only)."""
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as eager_flex

    def visible(b, h, q_idx, kv_idx):
        seen = kv_idx <= q_idx
        if starts is not None:
            seen = seen & (kv_idx >= starts[b, q_idx])
        if window:
            seen = seen & (q_idx - kv_idx < window)
        return seen

    T = q.size(-2)
    block_mask = create_block_mask(visible, q.size(0) if starts is not None else None, None, T, T, device=q.device)
    return (_compiled_flex() if q.is_cuda else eager_flex)(q, k, v, block_mask=block_mask)


def compute_dtype(device: torch.device, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype activations have on `device`: autocast's when it is on, else the parameters'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return param_dtype
