"""Generation: the sampling filters on logits in vocabulary order, and the KV cache against full forwards.

The filters' kept sets are checked against a reference written with plain Python sorting, on logits whose
order has nothing to do with the vocabulary order (a filter that forgets to map its sorted view back to
the vocabulary keeps the wrong tokens here, while already-sorted logits would hide it).
"""
import math

import pytest
import torch

from conftest import KERNEL_DEVICE
from tritongpt.generate import KVCache, check_sampling, filter_logits, sample_next_token
from model import GPT, GPTConfig


def reference_kept(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> set[int]:
    """Token ids one row of logits keeps: the top_k largest, then, renormalized over those, the most likely
    tokens in turn until their probability reaches top_p (at least one)."""
    values = [float(v) for v in logits.double()]
    ranked = sorted(range(len(values)), key=lambda i: values[i], reverse=True)
    if top_k is not None:
        ranked = ranked[:top_k]
    if top_p is None:
        return set(ranked)
    total = sum(math.exp(values[i] - values[ranked[0]]) for i in ranked)
    kept, mass = [], 0.0
    for i in ranked:
        if kept and mass >= top_p:
            break
        kept.append(i)
        mass += math.exp(values[i] - values[ranked[0]]) / total
    return set(kept)


def random_logits(rows=6, vocab=37, seed=0):
    """Logits spread over a few units, so several tokens share most of the mass, in random vocab order."""
    return 2 * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("top_k,top_p", [
    (1, None), (5, None), (36, None), (37, None), (1000, None),  # top_k above the vocabulary keeps all
    (None, 0.0), (None, 0.3), (None, 0.75), (None, 0.95), (None, 1.0),
    (5, 0.5), (10, 0.9), (3, 0.0), (1000, 0.6),
])
def test_filters_keep_the_reference_set_in_vocabulary_order(top_k, top_p):
    logits = random_logits()
    kept = torch.isfinite(filter_logits(logits, top_k, top_p))
    for row in range(logits.size(0)):
        actual = set(kept[row].nonzero().flatten().tolist())
        assert actual == reference_kept(logits[row], top_k, top_p), f"row {row}"
    survivors = filter_logits(logits, top_k, top_p)
    assert torch.equal(survivors[kept], logits[kept])  # kept logits are untouched


def test_top_p_zero_is_greedy_and_never_crashes():
    logits = random_logits(rows=50, seed=1)
    gen = torch.Generator().manual_seed(0)
    tokens = sample_next_token(logits, 1.0, top_p=0.0, generator=gen)
    assert torch.equal(tokens, logits.argmax(-1, keepdim=True))


def test_temperature_zero_is_argmax_whatever_the_filters():
    logits = random_logits(rows=50, seed=2)
    for top_k, top_p in ((None, None), (3, None), (None, 0.5), (1000, 1.0)):
        assert torch.equal(sample_next_token(logits, 0.0, top_k, top_p), logits.argmax(-1, keepdim=True))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 6, None), (1.3, None, 0.8), (1.0, 8, 0.9)])
def test_sampled_frequencies_follow_the_renormalized_probabilities(temperature, top_k, top_p):
    """One row of unsorted logits repeated 40000 times: each token's frequency within 4.5 standard errors."""
    logits = random_logits(rows=1, vocab=12, seed=3)
    n = 40_000
    tokens = sample_next_token(logits.expand(n, -1), temperature, top_k, top_p, torch.Generator().manual_seed(4))
    counts = torch.bincount(tokens.flatten(), minlength=12).double()
    kept = reference_kept(logits[0] / temperature, top_k, top_p)
    weights = torch.tensor([math.exp(float(v) / temperature) if i in kept else 0.0
                            for i, v in enumerate(logits[0].double())], dtype=torch.float64)
    expected = weights / weights.sum()
    standard_error = (expected * (1 - expected) / n).sqrt().clamp_min(1e-9)
    assert ((counts / n - expected).abs() <= 4.5 * standard_error).all(), (counts / n, expected)


@pytest.mark.parametrize("temperature,top_k,top_p,message", [
    (-0.5, None, None, "temperature must be a number >= 0"),
    (float("nan"), None, None, "temperature must be a number >= 0"),
    (1.0, 0, None, "top_k must be an integer >= 1"),
    (1.0, 2.5, None, "top_k must be an integer >= 1"),
    (1.0, None, 1.5, "top_p must be between 0 and 1"),
    (1.0, None, -0.1, "top_p must be between 0 and 1"),
])
def test_bad_sampling_settings_are_clear_errors(temperature, top_k, top_p, message):
    with pytest.raises(ValueError, match=message):
        check_sampling(temperature, top_k, top_p)
    with pytest.raises(ValueError, match=message):
        sample_next_token(random_logits(), temperature, top_k, top_p)


@pytest.mark.parametrize("max_new_tokens", [-3, 2.5])
def test_bad_token_count_is_a_clear_error(max_new_tokens):
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        check_sampling(1.0, None, None, max_new_tokens)


# -----------------------------------------------------------------------------
# The KV cache: every position's logits equal a full forward's, for every attention implementation

# head dim 16, the smallest the Triton kernel takes (it runs in the interpreter on CPU)
CONFIG = GPTConfig(block_size=24, vocab_size=53, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)


@pytest.mark.parametrize("impl", ["eager", "sdpa", "triton"])
@pytest.mark.parametrize("chunks", [
    [1] * 24,  # one token at a time from the first
    [7] + [1] * 17,  # a prompt, then single tokens up to block_size
    [5, 3, 1, 6, 9],  # multi-token chunks after a prompt: queries fewer than keys, but more than one
])
@pytest.mark.parametrize("pos_embedding", ["learned", "rope"])
def test_kv_cache_logits_equal_a_full_forward_at_every_position(impl, chunks, pos_embedding):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**CONFIG.__dict__, "pos_embedding": pos_embedding}), attn_impl=impl,
                ln_impl="torch").to(KERNEL_DEVICE).eval()
    x = torch.randint(0, CONFIG.vocab_size, (3, sum(chunks)), generator=torch.Generator().manual_seed(1))
    x = x.to(KERNEL_DEVICE)
    with torch.no_grad():
        full, _ = model(x, x)  # with targets: the logits of every position
        cache = KVCache(model.config)
        start = 0
        for size in chunks:
            chunk = x[:, start:start + size]
            step, _ = model(chunk, chunk, cache=cache)  # targets make it return every position's logits
            torch.testing.assert_close(step, full[:, start:start + size], atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{impl}, positions {start}..{start + size - 1}: {m}")
            start += size
