"""Document masking and sliding windows in kernels/flash_attention.py, against float64 attention with the
mask written out here, position by position.

Packed rows hold documents one after another; a query sees the keys of its own document only, and with a
window only the last `window` keys. Without a GPU the kernels run in Triton's interpreter (32-row held,
16-row streamed tiles by default), and every GPU tiling runs through `tiles=`. The last test counts the key
tiles each program loads and checks them against the tiles the mask leaves non-empty: the saving, shown
without a GPU.
"""
import json
import os
import random
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import KERNEL_DEVICE, REPO
from dropout_masks import dropout_mask
from kernels.flash_attention import flash_attention
from test_flash_attention import GPU_TILINGS, assert_flash_rule, assert_matches, forward_backward, randn

DEVICE = KERNEL_DEVICE


def bounds(lengths_per_row: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, ends) for rows made of documents of these lengths, by hand."""
    starts, ends = [], []
    for lengths in lengths_per_row:
        row_starts, row_ends, position = [], [], 0
        for length in lengths:
            row_starts += [position] * length
            row_ends += [position + length] * length
            position += length
        starts.append(row_starts)
        ends.append(row_ends)
    return (torch.tensor(starts, dtype=torch.int32, device=DEVICE), torch.tensor(ends, dtype=torch.int32, device=DEVICE))


def random_lengths(T: int, rows: int, mean: float, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    result = []
    for _ in range(rows):
        lengths = []
        while sum(lengths) < T:
            lengths.append(min(max(1, int(rng.expovariate(1 / mean))), T - sum(lengths)))
        result.append(lengths)
    return result


def dense_mask(starts: torch.Tensor | None, window: int, B: int, T: int) -> torch.Tensor:
    """mask[b, 0, i, j]: query i sees key j. Written out one entry at a time."""
    mask = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            first = int(starts[b, i]) if starts is not None else 0
            if window:
                first = max(first, i - window + 1)
            mask[b, 0, i, first:i + 1] = True
    return mask.to(DEVICE)


def masked_attention(q, k, v, mask, dropout_keep=None, dropout_p=0.0):
    """Attention with an explicit boolean mask, in the inputs' dtype."""
    scores = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    if dropout_keep is not None:
        probs = probs * dropout_keep / (1 - dropout_p)
    return probs @ v


def reference64(q, k, v, do, mask, **kwargs):
    return forward_backward(masked_attention, q.double(), k.double(), v.double(), do.double(), mask=mask, **kwargs)


def run_case(B, H, T, D, lengths=None, window=0, seed=0, **kwargs):
    q, k, v, do = (randn(B, H, T, D, seed=seed + s) for s in range(4))
    documents = bounds(lengths) if lengths is not None else None
    actual = forward_backward(flash_attention, q, k, v, do, documents=documents, window=window, **kwargs)
    mask = dense_mask(documents[0] if documents else None, window, B, T)
    return actual, reference64(q, k, v, do, mask), (q, k, v, do, documents, mask)


@pytest.mark.parametrize("name, B, T, lengths, window", [
    ("random documents", 2, 45, random_lengths(45, 2, 9, seed=1), 0),
    ("every token its own document", 1, 33, [[1] * 33], 0),
    ("documents of length 1 among longer ones", 2, 40, [[1, 14, 1, 1, 23], [20, 1, 19]], 0),
    ("boundaries on the tile edges", 1, 64, [[16, 16, 32]], 0),
    ("boundaries one off the tile edges", 2, 64, [[15, 17, 31, 1], [17, 15, 33 - 1]], 0),
    ("one document", 1, 50, [[50]], 0),
    ("window of 1", 1, 40, None, 1),
    ("window smaller than a tile", 2, 50, None, 7),
    ("window of two tiles", 1, 70, None, 32),
    ("window longer than T", 1, 30, None, 100),
    ("documents and a window", 2, 60, random_lengths(60, 2, 20, seed=2), 11),
])
@pytest.mark.parametrize("deterministic", [False, True])
def test_masked_attention_matches_float64(name, B, T, lengths, window, deterministic):
    actual, expected, _ = run_case(B, 2, T, 32, lengths, window, deterministic=deterministic)
    assert_matches(actual, expected)


def test_one_document_and_no_window_is_the_plain_kernel_to_the_bit():
    q, k, v, do = (randn(2, 2, 77, 48, seed=s) for s in range(4))
    plain = forward_backward(flash_attention, q, k, v, do)
    one_document = bounds([[77], [77]])
    for deterministic in (False, True):
        masked = forward_backward(flash_attention, q, k, v, do, documents=one_document, deterministic=deterministic)
        reference = forward_backward(flash_attention, q, k, v, do, deterministic=deterministic)
        for a, b in zip(masked, reference):
            assert torch.equal(a, b)
    for a, b in zip(forward_backward(flash_attention, q, k, v, do, window=77), plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_pytorchs_error(dtype):
    lengths = random_lengths(70, 2, 15, seed=3)
    q, k, v, do = (randn(2, 2, 70, 64, dtype=dtype, seed=s) for s in range(4))
    documents = bounds(lengths)
    mask = dense_mask(documents[0], 20, 2, 70)
    actual = forward_backward(flash_attention, q, k, v, do, documents=documents, window=20)
    torch_low = forward_backward(masked_attention, q, k, v, do, mask=mask)
    assert_flash_rule(actual, torch_low, reference64(q, k, v, do, mask))


def test_dropout_with_documents_uses_the_plain_kernels_mask():
    lengths = random_lengths(48, 1, 12, seed=4)
    q, k, v, do = (randn(1, 2, 48, 32, seed=s) for s in range(4))
    documents = bounds(lengths)
    actual = forward_backward(flash_attention, q, k, v, do, documents=documents, window=9, dropout_p=0.3, seed=5)
    keep = dropout_mask(5, 1, 2, 48, 0.3, DEVICE)
    expected = reference64(q, k, v, do, dense_mask(documents[0], 9, 1, 48), dropout_keep=keep, dropout_p=0.3)
    assert_matches(actual, expected)


@pytest.mark.parametrize("tiles,deterministic,dtype,dropout", GPU_TILINGS)
def test_every_gpu_tiling_masks_alike(tiles, deterministic, dtype, dropout):
    """Document boundaries on, and one off, the tiling's own tile edges, and a window of one streamed tile
    plus one, over lengths spanning several of its largest tiles."""
    held, streamed = max(tiles[0].held, tiles[1].held), min(tiles[0].streamed, tiles[1].streamed)
    T = 2 * held + streamed + 3
    lengths = [[held, 1, streamed - 1, T - held - streamed], [held + 1, T - held - 1]]
    actual, expected, _ = run_case(2, 1, T, 40, lengths, streamed + 1, tiles=tiles, deterministic=deterministic)
    assert_matches(actual, expected)


@pytest.mark.parametrize("documents, window, message", [
    ("pair", 0, "causal=True"),
    ((torch.zeros(1, 8, dtype=torch.int32),) * 2, 0, r"shape \(B, T\) = \(1, 16\)"),
    ((torch.zeros(1, 16),) * 2, 0, "must be an integer tensor"),
    (None, -1, "window=-1 must be an int >= 0"),
])
def test_bad_documents_and_windows_are_clear_errors(documents, window, message):
    q = randn(1, 2, 16, 16)
    if documents == "pair":
        with pytest.raises(ValueError, match=message):
            flash_attention(q, q, q, causal=False, documents=bounds([[16]]))
        return
    documents = tuple(d.to(DEVICE) for d in documents) if documents else None
    with pytest.raises(ValueError, match=message):
        flash_attention(q, q, q, documents=documents, window=window)


# -----------------------------------------------------------------------------
# The saving: which key tiles each program loads, in the interpreter

TILE_COUNT_SCRIPT = """
import json, sys
import numpy as np
import torch
import triton.runtime.interpreter as interpreter
from kernels.flash_attention import flash_attention

case = json.loads(sys.argv[1])
B, H, T, D, window = case["B"], case["H"], case["T"], case["D"], case["window"]
starts = torch.tensor(case["starts"], dtype=torch.int32)
ends = torch.tensor(case["ends"], dtype=torch.int32)
q, k, v = (torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(s)).requires_grad_() for s in range(3))
watched = {}  # name -> (first byte, bytes) of the tensors whose loads are counted
loads = {}  # name -> sorted [program (x, y, z), position] pairs

builder = interpreter.interpreter_builder
real_load = builder.create_masked_load


def counting_load(ptrs, mask, other, cache_policy, is_volatile):
    addresses = ptrs.data[mask.data.astype(bool)] if mask.data.shape else ptrs.data
    for name, (first, size) in watched.items():
        inside = addresses[(addresses >= first) & (addresses < first + size)]
        positions = ((inside - first) // 4 // D) % T
        loads.setdefault(name, set()).update((builder.grid_idx, int(p)) for p in np.unique(positions))
    return real_load(ptrs, mask, other, cache_policy, is_volatile)


builder.create_masked_load = counting_load
out = flash_attention(q, k, v, documents=(starts, ends), window=window, deterministic=case["deterministic"])
watched["k_forward"] = (k.data_ptr(), k.numel() * 4)
loads.clear()
out = flash_attention(q, k, v, documents=(starts, ends), window=window, deterministic=case["deterministic"])
forward = sorted(loads.get("k_forward", ()))
watched.clear()
watched["q_backward"] = (q.data_ptr(), q.numel() * 4)
loads.clear()
out.backward(torch.ones_like(out))
print(json.dumps({"forward_k": forward, "backward_q": sorted(loads.get("q_backward", ()))}))
"""


def visited_tiles(pairs, tile: int) -> set:
    """(program's tile, loaded tile) pairs from (program (x, y, z), position) pairs of one head."""
    return {(program[0], position // tile) for program, position in pairs if program[1] == 0 and program[2] == 0}


@pytest.mark.parametrize("lengths, window", [
    ([[40, 1, 30, 25, 32]], 0),  # documents of realistic variety, one of a single token
    ([[128]], 24),  # a window
    ([[20, 60, 48]], 40),  # both
])
def test_only_the_tiles_the_mask_leaves_non_empty_are_loaded(lengths, window):
    """In the interpreter (default tiles: 32 held, 16 streamed): the forward of each 32-query tile loads
    exactly the 16-key tiles holding a key one of its queries sees; the one-pass backward of each 32-key
    tile loads exactly the 16-query tiles holding a query that sees one of its keys. Counted from the
    kernels' own loads, in a process of its own with TRITON_INTERPRET=1 (on a GPU machine too)."""
    T = sum(lengths[0])
    starts, ends = bounds(lengths)
    case = {"B": 1, "H": 1, "T": T, "D": 16, "window": window, "deterministic": False,
            "starts": starts.cpu().tolist(), "ends": ends.cpu().tolist()}
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", TILE_COUNT_SCRIPT, json.dumps(case)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    mask = dense_mask(starts.cpu(), window, 1, T)[0, 0].cpu()
    held, streamed = 32, 16
    programs = (T + held - 1) // held
    # the causal forward launches its query tiles heaviest (last) first: program x holds tile programs-1-x
    expected_forward = {(x, key_tile) for x in range(programs) for key_tile in range((T + streamed - 1) // streamed)
                        if mask[(programs - 1 - x) * held:(programs - x) * held,
                                key_tile * streamed:(key_tile + 1) * streamed].any()}
    expected_backward = {(x, query_tile) for x in range(programs) for query_tile in range((T + streamed - 1) // streamed)
                         if mask[query_tile * streamed:(query_tile + 1) * streamed, x * held:(x + 1) * held].any()}
    assert visited_tiles(result["forward_k"], streamed) == expected_forward
    assert visited_tiles(result["backward_q"], streamed) == expected_backward
    all_tiles = programs * ((T + streamed - 1) // streamed)
    assert len(expected_forward) < all_tiles / 2  # the mask leaves most tiles out: the saving is real here


# -----------------------------------------------------------------------------
# The model: documents from the tokens, every implementation alike, positions, the KV cache

from tritongpt.generate import KVCache  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tritongpt.ops import document_bounds  # noqa: E402

EOT = 3  # the document token of these tiny vocabularies
MODEL = GPTConfig(block_size=40, vocab_size=13, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)


def tokens_with_documents(B: int, T: int, seed: int) -> torch.Tensor:
    """Random tokens with EOT at random places, never adjacent at the start (a row may start mid-document)."""
    x = torch.randint(4, MODEL.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))
    for b in range(B):
        for t in random.Random(seed + b).sample(range(1, T), T // 6):
            x[b, t] = EOT
    return x


def test_document_bounds_from_the_tokens():
    x = tokens_with_documents(3, 30, seed=0)
    x[1] = EOT  # every token its own document
    starts, ends = document_bounds(x, EOT)
    for b in range(3):
        marks = [t for t in range(30) if x[b, t] == EOT]
        for t in range(30):
            expected_start = max([0] + [m for m in marks if m <= t])
            expected_end = min([30] + [m for m in marks if m > t])
            assert (int(starts[b, t]), int(ends[b, t])) == (expected_start, expected_end), (b, t)


@pytest.mark.parametrize("switches", [dict(doc_token=EOT), dict(attn_window=6), dict(doc_token=EOT, attn_window=9)])
def test_every_implementation_masks_alike(switches):
    """eager (the mask spelled out), sdpa (an explicit mask) and triton (the kernel's own): the same loss and
    gradients."""
    x = tokens_with_documents(2, MODEL.block_size, seed=1).to(DEVICE)
    results = {}
    for impl in ("eager", "sdpa", "triton"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{**vars(MODEL), **switches}), impl, "torch").to(DEVICE)
        _, loss = model(x, x)
        loss.backward()
        results[impl] = (loss.item(), [p.grad for p in model.parameters()])
    for impl in ("sdpa", "triton"):
        assert results[impl][0] == pytest.approx(results["eager"][0], rel=1e-5)
        for a, b in zip(results[impl][1], results["eager"][1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pos_embedding", ["learned", "rope"])
def test_with_restarting_positions_a_document_is_the_same_wherever_it_is_packed(pos_embedding):
    """doc_positions: a document's logits do not depend on what came before it in the row."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**vars(MODEL), "doc_token": EOT, "doc_positions": True, "pos_embedding": pos_embedding}),
                "sdpa", "torch").eval()
    document = torch.tensor([[EOT, 5, 9, 7, 7, 12, 4, 8]])
    before = torch.tensor([[6, 4, EOT, 11, 10, 5, 9]])
    alone, _ = model(document, document)
    packed, _ = model(torch.cat((before, document), 1), torch.cat((before, document), 1))
    torch.testing.assert_close(packed[:, before.size(1):], alone, atol=1e-5, rtol=1e-5)
    absolute = GPT(GPTConfig(**{**vars(MODEL), "doc_token": EOT, "pos_embedding": pos_embedding}), "sdpa", "torch").eval()
    absolute.load_state_dict(model.state_dict())
    shifted, _ = absolute(torch.cat((before, document), 1), torch.cat((before, document), 1))
    if pos_embedding == "learned":  # without restarting, the positions differ: so do the logits
        assert not torch.allclose(shifted[:, before.size(1):], alone, atol=1e-3)


@pytest.mark.parametrize("switches", [dict(doc_token=EOT), dict(attn_window=5),
                                      dict(doc_token=EOT, attn_window=7, doc_positions=True),
                                      dict(doc_token=EOT, doc_positions=True, pos_embedding="rope")])
@pytest.mark.parametrize("impl", ["eager", "sdpa", "triton"])
def test_the_kv_cache_gives_a_full_forwards_logits_and_keeps_only_the_window(switches, impl):
    config = GPTConfig(**{**vars(MODEL), **switches})
    torch.manual_seed(0)
    model = GPT(config, impl, "torch").to(DEVICE).eval()
    x = tokens_with_documents(2, MODEL.block_size, seed=2).to(DEVICE)
    with torch.no_grad():
        full, _ = model(x, x)
        cache, start = KVCache(config), 0
        for size in (7, 1, 1, 9, 3, 1, 1, 17):
            chunk = x[:, start:start + size]
            step, _ = model(chunk, chunk, cache=cache)
            torch.testing.assert_close(step, full[:, start:start + size], atol=1e-5, rtol=1e-5)
            start += size
    assert cache.layers[0].k.shape[2] == (config.attn_window or config.block_size)


def test_generation_continues_within_the_last_document():
    """After a document token, what came before it no longer matters: two prompts that end in the same
    document generate the same tokens (greedy), with the cache and without."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**vars(MODEL), "doc_token": EOT, "doc_positions": True}), "sdpa", "torch").eval()
    tail = torch.tensor([[EOT, 5, 9, 7]])
    prompts = [torch.cat((torch.tensor([[4, 4, 6]]), tail), 1), torch.cat((torch.tensor([[11, EOT, 12, 10, 8, 6]]), tail), 1)]
    outputs = [model.generate(p, 12, temperature=0, use_cache=cache)[:, p.size(1):] for p in prompts for cache in (True, False)]
    assert all(torch.equal(o, outputs[0]) for o in outputs)


def test_pipeline_parallelism_refuses_documents_and_windows():
    from tritongpt.parallelism import LayoutError, plan_layout
    from tritongpt.pipeline import check_pipeline

    layout = plan_layout(2, 0, 1, 2)
    with pytest.raises(LayoutError, match="doc_token and attn_window mask attention by the tokens"):
        check_pipeline(GPTConfig(**{**vars(MODEL), "attn_window": 8}), layout, "1f1b", 2, 4, "float32")


def test_a_checkpoint_records_the_switches_and_rebuilds_them():
    from tritongpt import checkpoint as ckpt

    model = GPT(GPTConfig(**{**vars(MODEL), "doc_token": EOT, "attn_window": 16}), "sdpa", "torch")
    args = ckpt.model_args_of(model)
    assert args["doc_token"] == EOT and args["attn_window"] == 16 and "doc_positions" not in args
    assert GPTConfig.from_dict(args) == model.config
    assert set(ckpt.model_args_of(GPT(MODEL))) == set(ckpt.MODEL_ARG_KEYS)  # nanoGPT's model_args, unchanged


@pytest.mark.parametrize("switches", [dict(), dict(doc_token=EOT), dict(attn_window=5), dict(doc_token=EOT, attn_window=9)])
def test_flex_attention_takes_the_same_mask(switches):
    """attn_impl='flex': FlexAttention with a block mask of the documents and window (forward here: PyTorch has
    its backward on CUDA only) gives SDPA's output."""
    from tritongpt.ops import attention

    x = tokens_with_documents(2, 40, seed=4)
    model = GPT(GPTConfig(**{**vars(MODEL), **switches}), "sdpa", "torch")
    mask, _ = model.layout(x)
    q, k, v = (torch.randn(2, 2, 40, 16, generator=torch.Generator().manual_seed(s)) for s in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is unfused
        torch.testing.assert_close(attention(q, k, v, "flex", 0.0, mask), attention(q, k, v, "sdpa", 0.0, mask),
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="has no dropout"):
        attention(q, k, v, "flex", 0.1, mask)


def test_flex_is_refused_where_it_cannot_train():
    from tritongpt.impls import choose_impls

    model = GPT(GPTConfig(**{**vars(MODEL), "doc_token": EOT}), "flex", "torch")
    with pytest.raises(ValueError, match=r"attn_impl='flex' \(FlexAttention\) trains on CUDA only"):
        choose_impls(model, 1, "cpu", torch.float32)


def test_auto_measures_the_kernel_with_the_runs_mask():
    """choose_impls on a masked model: both candidates run under documents and the window (checked against
    each other), and the log says so."""
    from tritongpt.impls import choose_impls

    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**vars(MODEL), "doc_token": EOT, "attn_window": 12}), "auto", "torch").to(DEVICE)
    lines = []
    attn, _ = choose_impls(model, 2, DEVICE, torch.float32, measure=True, log=lines.append,
                           timer=lambda name, fn: (fn(), {"attn_impl=triton": 1.0}.get(name, 2.0))[1])
    assert attn == "triton" and "documents of T/4 and window 12" in lines[0] and "disagrees" not in lines[0]
