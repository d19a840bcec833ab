"""The operations the model runs in several implementations, and the masks they share: attention (`eager`,
`sdpa`, `triton`, `flex`), causal, restricted to documents and/or a sliding window; kernels/ imported on
first use, so CPU-only users never need Triton. model.py builds the GPT from these.
"""
import functools
import math
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F


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


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention as eager_flex

    return torch.compile(eager_flex, dynamic=False)


@functools.cache
def _causal_block_mask(seq_len: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, None, None, seq_len, seq_len, device=device)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: "AttentionMask | None") -> torch.Tensor:
    """Causal attention over (B, H, T, D) through FlexAttention with a block mask of the documents and window
    (made once per mask, which every layer of a forward shares). Compiled on CUDA (its fused kernel skips the
    empty blocks), eager elsewhere (forward only)."""
    from torch.nn.attention.flex_attention import flex_attention as eager_flex

    T = q.size(-2)
    block_mask = _causal_block_mask(T, q.device) if mask is None else mask.block_mask(T, q.device)
    return (_compiled_flex() if q.is_cuda else eager_flex)(q, k, v, block_mask=block_mask)


@dataclass
class AttentionMask:
    """What each query sees beyond causality, for a forward over whole rows: its document, from starts[b, t]
    to ends[b, t] (absolute positions, (B, T)), and/or the last `window` keys."""

    starts: torch.Tensor | None
    ends: torch.Tensor | None
    window: int
    _flex: object = field(default=None, repr=False, compare=False)  # FlexAttention's block mask, made once

    def dense(self, t: int, device: torch.device) -> torch.Tensor:
        """(B or 1, 1, T, T) bool, True where a query sees a key: for eager and SDPA."""
        rows = torch.arange(t, device=device)[:, None]
        cols = torch.arange(t, device=device)[None, :]
        visible = cols <= rows
        if self.window:
            visible = visible & (cols > rows - self.window)
        visible = visible[None, None]
        if self.starts is not None:
            visible = visible & (cols[None, None] >= self.starts[:, None, :, None])
        return visible

    def block_mask(self, t: int, device: torch.device):
        """FlexAttention's block mask of the same rule, for whole rows of length t."""
        if self._flex is None:
            from torch.nn.attention.flex_attention import create_block_mask

            def visible(b, h, q_idx, kv_idx):
                seen = kv_idx <= q_idx
                if self.starts is not None:
                    seen = seen & (kv_idx >= self.starts[b, q_idx])
                if self.window:
                    seen = seen & (q_idx - kv_idx < self.window)
                return seen

            batch = self.starts.size(0) if self.starts is not None else None
            self._flex = create_block_mask(visible, batch, None, t, t, device=device)
        return self._flex


def document_bounds(idx: torch.Tensor, doc_token: int, carried: torch.Tensor | None = None,
                    offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, ends), (B, T): where each position's document starts (its last doc_token at or before it)
    and where the next one starts (T, or the chunk's end, if none does), in positions offset.. (a KV cache's
    chunk). carried: (B,) the document start of the position before the chunk; 0 when none."""
    B, T = idx.shape
    positions = torch.arange(offset, offset + T, device=idx.device).expand(B, T)
    before = carried[:, None] if carried is not None else torch.full_like(idx[:, :1], offset)
    starts = torch.where(idx == doc_token, positions, before.expand(B, T)).cummax(dim=1).values
    next_starts = torch.where(idx == doc_token, positions, offset + T)
    later = torch.cat((next_starts[:, 1:], next_starts.new_full((B, 1), offset + T)), dim=1)
    ends = later.flip(1).cummin(dim=1).values.flip(1)
    return starts, ends


def causal_mask(t_query: int, t_key: int, device: torch.device) -> torch.Tensor:
    """Query i (the last t_query of t_key positions) may see keys up to its own position."""
    return torch.ones(t_query, t_key, dtype=torch.bool, device=device).tril(diagonal=t_key - t_query)


def attention(q, k, v, impl: str, dropout_p: float, mask: "AttentionMask | torch.Tensor | None" = None) -> torch.Tensor:
    """Causal attention over (B, H, T, D) tensors with a resolved impl ('eager', 'sdpa', 'triton' or 'flex'). Keys
    may be longer than queries (a KV cache): then the queries are the last positions. mask: documents and
    a window over whole rows (an AttentionMask), or which keys each query sees, explicitly (a (B, 1, Tq, Tk)
    bool tensor: a KV cache's under documents or a window)."""
    t_query, t_key = q.size(-2), k.size(-2)
    if impl == "flex" and t_query == t_key and not isinstance(mask, torch.Tensor):
        if dropout_p:
            raise ValueError("attn_impl='flex' has no dropout of the attention probabilities: set dropout=0.0, or use "
                             "attn_impl='triton' or 'sdpa'")
        return flex_attention(q, k, v, mask)
    if isinstance(mask, AttentionMask):
        if impl == "triton":
            documents = (mask.starts, mask.ends) if mask.starts is not None else None
            return kernels_module().flash_attention(q, k, v, causal=True, dropout_p=dropout_p, documents=documents,
                                                    window=mask.window)
        mask = mask.dense(t_query, q.device)
    if mask is not None:  # the keys each query sees, spelled out
        if impl == "eager":
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            return F.dropout(F.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1), p=dropout_p) @ v
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if impl == "triton" and t_query == t_key:
        return kernels_module().flash_attention(q, k, v, causal=True, dropout_p=dropout_p)
    if impl == "eager":
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        scores = scores.masked_fill(~causal_mask(t_query, t_key, q.device), float("-inf"))
        probs = F.dropout(F.softmax(scores, dim=-1), p=dropout_p)
        return probs @ v
    # sdpa, and the triton impl's decoding steps: SDPA aligns is_causal to the top left, so a query block
    # shorter than the keys gets an explicit mask, and a single query needs none.
    if t_query == t_key:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    mask = None if t_query == 1 else causal_mask(t_query, t_key, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
