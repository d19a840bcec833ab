"""Generation: the KV cache, the decoding loop, and the sampling filters (temperature, top_k, top_p).

GPT.generate_stream and GPT.generate (nanoGPT's API, in model.py) call generate_stream here. The model's
forward takes a KVCache and each attention layer updates its LayerCache; nothing else in model.py knows
about decoding.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

if TYPE_CHECKING:  # annotations only: model.py generates with this module
    from model import GPT, GPTConfig
    from tritongpt.ops import AttentionMask

# -----------------------------------------------------------------------------
# The KV cache


class LayerCache:
    """One layer's keys and values for incremental decoding, allocated on first use with the dtype the
    attention actually computes in (autocast's, under mixed precision)."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.k: torch.Tensor | None = None  # (B, H, max_length, D)
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the keys and values of positions start.., return those of all positions so far (the last
        max_length of them, once a rolling cache is full)."""
        if self.k is None or self.k.shape[0] != k.shape[0] or self.k.dtype != k.dtype:
            shape = (k.shape[0], k.shape[1], self.max_length, k.shape[3])
            self.k = k.new_empty(shape)
            self.v = v.new_empty(shape)
        end = start + k.shape[2]
        if end <= self.max_length:
            self.k[:, :, start:end] = k
            self.v[:, :, start:end] = v
            return self.k[:, :, :end], self.v[:, :, :end]
        # Rolling (RoPE models, one new token at a time): the new position takes the oldest one's slot. The
        # keys carry their positions in their rotation, so a single query needs them in no particular order.
        slot = start % self.max_length
        self.k[:, :, slot] = k[:, :, 0]
        self.v[:, :, slot] = v[:, :, 0]
        return self.k, self.v

    def update_masked(self, k: torch.Tensor, v: torch.Tensor, start: int,
                      mask: AttentionMask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a model with documents or a window: the keys and values the chunk at positions start.. attends
        to (the cached ones, then its own), and which of them each query sees, (B, 1, Tq, Tk); then the
        chunk is stored. Each slot holds the position start % capacity; with a window the capacity is the
        window (never more than max_length), so the cache keeps exactly the keys a query can still see."""
        capacity = min(self.max_length, mask.window) if mask.window else self.max_length
        if start == 0 or self.k is None or self.k.shape[0] != k.shape[0] or self.k.dtype != k.dtype:
            shape = (k.shape[0], k.shape[1], capacity, k.shape[3])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
            self.positions = torch.full((capacity,), -1, dtype=torch.long, device=k.device)  # -1: empty
        t = k.shape[2]
        queries = torch.arange(start, start + t, device=k.device)
        keys = torch.cat((self.positions, queries))
        visible = (keys >= 0) & (keys <= queries[:, None])
        if mask.window:
            visible = visible & (keys > queries[:, None] - mask.window)
        visible = visible[None, None]
        if mask.starts is not None:
            visible = visible & (keys >= mask.starts[:, None, :, None])
        all_k, all_v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        kept = range(max(0, t - capacity), t)  # the chunk's last `capacity` positions
        slots = torch.tensor([(start + i) % capacity for i in kept], device=k.device)
        self.k[:, :, slots] = k[:, :, kept.start:]
        self.v[:, :, slots] = v[:, :, kept.start:]
        self.positions[slots] = queries[kept.start:]
        return all_k, all_v, visible


class KVCache:
    """Keys and values of every layer for the positions seen so far (generation only). A rolling cache
    (RoPE models) keeps going past block_size, each new position taking the oldest one's place."""

    def __init__(self, config: GPTConfig, rolling: bool = False):
        if rolling and config.pos_embedding != "rope":
            raise ValueError("a rolling KV cache needs pos_embedding='rope': learned position embeddings are "
                             "absolute, and a position past block_size has none")
        self.layers = [LayerCache(config.block_size) for _ in range(config.n_layer)]
        self.length = 0  # positions filled
        self.rolling = rolling
        self.doc_start: torch.Tensor | None = None  # (B,) where the last position's document starts


# -----------------------------------------------------------------------------
# Decoding


@torch.no_grad()
def generate_stream(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    refill: int | None = None,
    roll: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield max_new_tokens next tokens (B, 1), one at a time, continuing idx (B, T).

    Each token is conditioned on the last block_size tokens, as in nanoGPT. With the KV cache the prompt
    is run once and then each step runs only the newest token. Once the sequence is longer than
    block_size, a learned position embedding shifts with the window, so the cache cannot be reused and
    each step runs the whole window again: exactly what happens without the cache. `refill=N` trades
    that exactness for speed: when the window is full, restart the cache from the last N tokens and
    decode one token per step again until it fills, so each token sees between N and block_size tokens.
    `roll=True` (RoPE models, whose attention depends on relative positions only) keeps decoding one
    token per step past block_size: the newest position replaces the oldest in every layer's cache, so
    each token attends to the cached states of the last block_size positions. With one layer that is
    exactly the window rerun; with more, those cached states were computed from their own windows, so
    information reaches further back (sliding-window attention) and the result differs from a rerun.
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    block_size = model.config.block_size
    rolling = use_cache and roll
    if refill is not None and rolling:
        raise ValueError("refill and roll are two ways past block_size: pick one")
    if refill is not None and not 0 < refill < block_size:
        raise ValueError(f"refill must be between 1 and block_size - 1 ({block_size - 1}), got {refill}")
    cache = KVCache(model.config, rolling) if use_cache else None
    if cache is not None and model.running.attn == "triton" and not model.told_about_decoding:
        model.told_about_decoding = True  # once per choice of implementations
        print("attn_impl='triton': the single-token decoding steps run SDPA (the kernel is for whole blocks)",
              file=sys.stderr)
    for _ in range(max_new_tokens):
        if cache is not None and 0 < cache.length and (cache.length < block_size or rolling):
            logits, _ = model(idx[:, -1:], cache=cache)
        elif cache is not None and (cache.length == 0 or refill is not None):
            context = block_size if cache.length == 0 else refill
            cache.length = 0
            logits, _ = model(idx[:, -context:], cache=cache)
        else:  # no cache, or an exact one past block_size, where what it would store is never reused
            logits, _ = model(idx[:, -block_size:])
        idx_next = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)
        idx = torch.cat((idx, idx_next), dim=1)
        yield idx_next


def sample_next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of logits (B, V): greedy at temperature 0, else sampled from the softmax at that
    temperature over the tokens filter_logits keeps."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = F.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits (B, V) with -inf for the tokens sampling leaves out: all but the top_k most likely, and/or all
    but the smallest set whose probability reaches top_p (nucleus sampling; top_p=0 keeps the most likely
    token only). The tokens stay in vocabulary order."""
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the ones ranked above it already reach top_p; the most likely always stays,
        # even at top_p=0, where nothing ranks above it and "already reach 0" would drop it too
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop_sorted[:, 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int = 0) -> None:
    """A clear ValueError for sampling settings that mean nothing."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1, or None to keep every token; got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 <= top_p <= 1):
        raise ValueError(f"top_p must be between 0 and 1 (0 keeps only the most likely token, 1 or None keeps "
                         f"all), got {top_p!r}")
