"""Attention: how much faster and leaner is our Triton FlashAttention than what you would write by hand,
and than what PyTorch ships?

    python bench/attn.py                                  # the full sweep, on the GPU, in bfloat16
    python bench/attn.py --dtype=float16 --causal=yes --mode fwd+bwd --out bench/results
    python bench/attn.py --quick                          # a few seconds, on CPU too

Implementations: `eager` (q @ k^T, mask, softmax, @ v: ops.attention's 'eager'), `sdpa`
(F.scaled_dot_product_attention as a user gets it: PyTorch's choice of backend, named in each row's note;
on an H100/H200 with torch 2.11 that is cuDNN), `sdpa_flash` and `sdpa_cudnn` (SDPA restricted to its
FlashAttention-2 or its cuDNN backend, where they run), `flex` (torch.nn.attention.flex_attention,
compiled, with a causal block mask; CUDA only: it has no backward on CPU) and `triton`
(kernels/flash_attention.py; CUDA only). vs_sdpa compares with the default.

Every case holds 16k tokens, batch x T = 16384 for T from 512 to 16384 (so batch 1 at the longest T),
with GPT-2's 12 heads of 64 and with 6 heads of 128 (the same width, 768). q, k and v are views of one (B, T, 3, H, D) tensor, as the model makes them.
Without CUDA the sweep is smaller (T up to 1024, 2048 tokens) and the Triton rows are skipped.

Then the masked rows (--masks no skips them): causal attention restricted to documents and/or a sliding
window, at T=8192 on a GPU (512 on CPU), with document lengths drawn from data/python_stdlib's files when
that corpus is there (bench/documents.py makes it), else around 1k tokens. `eager` and `sdpa` take the
mask spelled out (ops.attention's path), `flex` a block mask, `triton` the documents and window
themselves; tiles_pct is the share of the causal forward's 128x64 tiles that the mask leaves non-empty,
the work the Triton kernel and FlexAttention do (arithmetic; tests/test_attention_masks.py checks that the
kernel loads exactly those).
"""
import functools
import math
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from tritongpt.impls import sdpa_backend  # noqa: E402
from tritongpt import ops  # noqa: E402
from tritongpt.ops import AttentionMask, document_bounds  # noqa: E402
from bench import common  # noqa: E402

IMPLS = ("eager", "sdpa", "sdpa_flash", "sdpa_cudnn", "flex", "triton")
SDPA_BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}
MODES = ("fwd", "bwd", "fwd+bwd")
WIDTH = 768  # GPT-2's model width: heads = WIDTH // head_dim
# The sweep by run size: "gpu", "cpu" (no CUDA) or "quick" (--quick)
SEQ_LENS = {"gpu": (512, 1024, 2048, 4096, 8192, 16384), "cpu": (128, 256, 512, 1024), "quick": (32, 64)}
TOKENS = {"gpu": 16384, "cpu": 2048, "quick": 128}  # batch x T of every case
HEAD_DIMS = {"gpu": (64, 128), "cpu": (64, 128), "quick": (64,)}
REP_MS = {"gpu": 100.0, "cpu": 100.0, "quick": 5.0}  # time spent timing each case
COLUMNS = ("impl", "mode", "mask", "causal", "B", "T", "H", "D", "ms", "TFLOPS", "tiles_pct", "peak_MiB",
           "vs_sdpa", "vs_eager", "mem_vs_eager", "note")
MASKED_IMPLS = ("eager", "sdpa", "flex", "triton")
MASKED_SHAPES = {"gpu": (2, 8192), "cpu": (1, 512), "quick": (1, 64)}  # (B, T) of the masked cases
CORPUS = Path("data/python_stdlib/train.bin")  # GPT-2 tokens of the standard library's modules, one per file
TILE = (128, 64)  # the forward's largest tiling, for tiles_pct


def attention_flops(batch: int, heads: int, seq_len: int, head_dim: int, causal: bool, mode: str) -> float:
    """FlashAttention's count: the forward's two matmuls (q k^T and p v) are 4 B H T^2 D FLOPs, half of
    them when causal; the backward's five matmuls count 2.5 forwards, so forward + backward is 3.5."""
    forward = 4 * batch * heads * seq_len**2 * head_dim / (2 if causal else 1)
    return forward * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def attention_shapes(seq_lens: list[int], tokens: int) -> list[tuple[int, int]]:
    """(batch, T) with batch x T = tokens (at least batch 1), plus batch 1 at the longest T."""
    shapes = [(max(1, tokens // t), t) for t in seq_lens]
    longest = (1, max(seq_lens))
    return shapes if longest in shapes else [*shapes, longest]


def eager(q, k, v, causal: bool):
    """What people write by hand: the whole T x T score matrix, masked, softmaxed, times v."""
    if causal:
        return ops.attention(q, k, v, "eager", 0.0)
    # ops.attention is causal only; this is its eager path without the mask
    return F.softmax((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1))), dim=-1) @ v


def sdpa(q, k, v, causal: bool):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def sdpa_with(backend: SDPBackend):
    """SDPA restricted to one backend (the backward runs the same backend's kernel)."""
    def restricted(q, k, v, causal: bool):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return restricted


def flex(q, k, v, causal: bool):
    """PyTorch's own block-sparse attention: compiled FlexAttention, skipping the masked half (causal only)."""
    return ops.attention(q, k, v, "flex", 0.0)


def implementations(names: list[str], device: str, causal: bool = True) -> dict:
    fns = {"eager": eager, "sdpa": sdpa, **{name: sdpa_with(backend) for name, backend in SDPA_BACKENDS.items()}}
    if device.startswith("cuda"):
        from kernels.flash_attention import flash_attention  # imported here: runs without CUDA need no Triton

        if causal:
            fns["flex"] = flex
        fns["triton"] = lambda q, k, v, causal: flash_attention(q, k, v, causal=causal)
    return {name: fns[name] for name in names if name in fns}


def backend_runs(backend: SDPBackend, device: str, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether one of SDPA's backends has a kernel for this device, dtype and head size."""
    x = torch.zeros(1, 1, 16, head_dim, device=device, dtype=dtype)
    try:
        with warnings.catch_warnings(), sdpa_kernel(backend):
            warnings.simplefilter("ignore")  # the reasons a backend was skipped, one warning each
            F.scaled_dot_product_attention(x, x, x, is_causal=True)
    except RuntimeError:
        return False
    return True


def make_inputs(batch: int, seq_len: int, heads: int, head_dim: int, device: str, dtype: torch.dtype):
    """q, k, v as the model makes them (strided views of one (B, T, 3, H, D) projection), as leaves that
    take gradients, and an output gradient laid out like the model's (the transpose of a (B, T, H, D))."""
    torch.manual_seed(0)
    qkv = torch.randn(batch, seq_len, 3, heads, head_dim, device=device, dtype=dtype)
    q, k, v = (t.detach().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4))
    grad_out = torch.randn(batch, seq_len, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
    return q, k, v, grad_out


def reference(q, k, v, grad_out, causal: bool):
    """Output and input gradients in float32 (SDPA with PyTorch's choice of backend), to check against."""
    inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*inputs, is_causal=causal)
    grads = torch.autograd.grad(out, inputs, grad_out.float())
    return out.detach(), grads


def bench_shape(impls: dict, batch: int, seq_len: int, heads: int, head_dim: int, causal: bool, modes: list[str],
                device: str, dtype: str, rep_ms: float) -> list[dict]:
    q, k, v, grad_out = make_inputs(batch, seq_len, heads, head_dim, device, getattr(torch, dtype))
    ref_out, ref_grads = reference(q, k, v, grad_out, causal)
    default_backend = sdpa_backend(q, k, v, causal)
    rows = []
    for name, fn in impls.items():
        for mode in modes:
            expected = (ref_out,) if mode == "fwd" else ref_grads
            case = functools.partial(common.run_case, functools.partial(fn, causal=causal), (q, k, v), grad_out, mode,
                                     expected, device, rep_ms)
            result, note = common.attempt(case)
            ms, peak, error = result or (None, None, None)
            if error is not None:
                note = common.mismatch_note(error, dtype)
            if name == "sdpa":
                note = f"backend: {default_backend}" + (f"; {note}" if note else "")
            flops = attention_flops(batch, heads, seq_len, head_dim, causal, mode)
            rows.append({
                "impl": name, "mode": mode, "mask": "-", "causal": causal, "B": batch, "T": seq_len, "H": heads,
                "D": head_dim, "ms": ms, "TFLOPS": flops / (ms * 1e-3) / 1e12 if ms else None, "tiles_pct": None,
                "peak_MiB": peak, "error": error, "note": note,
            })
    return rows


# -----------------------------------------------------------------------------
# Documents and windows


def corpus_lengths() -> list[int] | None:
    """The token lengths of the corpus's documents (each starts with <|endoftext|>), if it is there."""
    if not CORPUS.exists():
        return None
    starts = np.flatnonzero(np.fromfile(CORPUS, dtype=np.uint16) == 50256)
    return np.diff(starts).tolist() or None


def packed_documents(batch: int, seq_len: int, lengths: list[int] | None, mean: int, seed: int) -> AttentionMask:
    """Rows cut from a stream of documents (from `lengths`, else exponential around `mean`), as train.py's
    random windows are: a row starts somewhere inside a document."""
    rng = np.random.default_rng(seed)
    tokens = torch.zeros(batch, seq_len, dtype=torch.long)
    for row in range(batch):
        position = -int(rng.integers(0, mean))  # the first document began before the row
        while position < seq_len:
            if position >= 0:
                tokens[row, position] = 1
            position += int(rng.choice(lengths)) if lengths else max(1, int(rng.exponential(mean)))
    starts, ends = document_bounds(tokens, 1)
    return AttentionMask(starts, ends, 0)


def mask_cases(batch: int, seq_len: int, device: str) -> list[tuple[str, AttentionMask]]:
    lengths = corpus_lengths()
    mean = min(1024, seq_len // 4)
    where = "the corpus's files" if lengths else f"~{mean} tokens"
    documents = packed_documents(batch, seq_len, lengths, mean, seed=0)
    documents = AttentionMask(documents.starts.to(device), documents.ends.to(device), 0)
    small, large = min(128, seq_len // 4), min(1024, seq_len // 2)
    return [(f"documents ({where})", documents), (f"window {small}", AttentionMask(None, None, small)),
            (f"window {large}", AttentionMask(None, None, large)),
            (f"documents + window {large // 2}", AttentionMask(documents.starts, documents.ends, large // 2))]


def masked_implementations(names: list[str], mask: AttentionMask, batch: int, seq_len: int, device: str) -> dict:
    """Each implementation under the mask: the model's own path (ops.attention) for ours and PyTorch's."""
    fns = {name: functools.partial(ops.attention, impl=name, dropout_p=0.0, mask=mask) for name in ("eager", "sdpa")}
    if device.startswith("cuda"):
        for name in ("flex", "triton"):
            fns[name] = functools.partial(ops.attention, impl=name, dropout_p=0.0, mask=mask)
    return {name: fns[name] for name in names if name in fns}


def visible_share(mask: AttentionMask, seq_len: int, tile: tuple[int, int] | None = None) -> float:
    """The share of the causal score matrix (of its tiles, with `tile`) that the mask leaves non-empty."""
    dense = mask.dense(seq_len, torch.device("cpu") if mask.starts is None else mask.starts.device)[:, 0].cpu()
    causal = AttentionMask(None, None, 0).dense(seq_len, torch.device("cpu"))[:, 0]
    if tile is None:
        return dense.sum().item() / (causal.sum().item() * dense.size(0))
    rows, cols = -(-seq_len // tile[0]), -(-seq_len // tile[1])

    def tiles(m):
        padded = torch.zeros(m.size(0), rows * tile[0], cols * tile[1], dtype=torch.bool)
        padded[:, :seq_len, :seq_len] = m
        return padded.view(m.size(0), rows, tile[0], cols, tile[1]).any(4).any(2).sum().item()

    return tiles(dense) / (tiles(causal) * dense.size(0))


def bench_masked(names: list[str], batch: int, seq_len: int, heads: int, head_dim: int, modes: list[str],
                 device: str, dtype: str, rep_ms: float) -> list[dict]:
    q, k, v, grad_out = make_inputs(batch, seq_len, heads, head_dim, device, getattr(torch, dtype))
    rows = []
    for label, mask in mask_cases(batch, seq_len, device):
        print(f"D={head_dim} B={batch} T={seq_len} {label}", file=sys.stderr, flush=True)
        inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
        out = ops.attention(*inputs, "sdpa", 0.0, mask)
        ref_out, ref_grads = out.detach(), torch.autograd.grad(out, inputs, grad_out.float())
        tiles_pct = 100 * visible_share(mask, seq_len, TILE)
        pairs = visible_share(mask, seq_len) * batch * seq_len * (seq_len + 1) / 2
        for name, fn in masked_implementations(names, mask, batch, seq_len, device).items():
            for mode in modes:
                expected = (ref_out,) if mode == "fwd" else ref_grads
                result, note = common.attempt(functools.partial(common.run_case, fn, (q, k, v), grad_out, mode,
                                                                expected, device, rep_ms))
                ms, peak, error = result or (None, None, None)
                flops = 4 * pairs * heads * head_dim * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
                rows.append({
                    "impl": name, "mode": mode, "mask": label, "causal": True, "B": batch, "T": seq_len, "H": heads,
                    "D": head_dim, "ms": ms, "TFLOPS": flops / (ms * 1e-3) / 1e12 if ms else None,
                    "tiles_pct": tiles_pct, "peak_MiB": peak, "error": error,
                    "note": common.mismatch_note(error, dtype) if error is not None else note,
                })
        common.free_memory()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    p.add_argument("--head_dim", nargs="+", type=int, help="D values, with 768 // D heads (default: 64 128)")
    p.add_argument("--seq_len", nargs="+", type=int, help="T values (default: 512 to 16384 on GPU)")
    p.add_argument("--tokens", type=int, help="batch x T of every case (default: 16384 on GPU)")
    p.add_argument("--masks", choices=("yes", "no", "only"), default="yes",
                   help="the document and window rows: with the plain ones, not at all, or alone")
    args = p.parse_args(argv)

    device, dtype = common.device_and_dtype(args)
    size = common.sweep_size(args, device)
    seq_lens = args.seq_len or list(SEQ_LENS[size])
    tokens = args.tokens or TOKENS[size]
    head_dims = args.head_dim or list(HEAD_DIMS[size])
    causals = {"both": (True, False), "yes": (True,), "no": (False,)}[args.causal]
    impls = implementations(args.impl, device)
    notes = []
    why_not = {"flex": "FlexAttention needs a CUDA GPU here (it has no backward on CPU); causal rows only",
               "triton": "the Triton kernels need a CUDA GPU"}
    for name, why in why_not.items():
        if name in args.impl and name not in impls:
            notes.append(f"{name}: not run; {why}")
            print(notes[-1], file=sys.stderr)
    backends = {name: [d for d in head_dims if backend_runs(backend, device, getattr(torch, dtype), d)]
                for name, backend in SDPA_BACKENDS.items() if name in impls}
    for name, dims in backends.items():
        if len(dims) < len(head_dims):
            notes.append(f"{name}: no kernel here for D in {sorted(set(head_dims) - set(dims))}")

    rows = []
    for head_dim in head_dims if args.masks != "only" else []:
        for causal in causals:
            for batch, seq_len in attention_shapes(seq_lens, tokens):
                print(f"D={head_dim} causal={causal} B={batch} T={seq_len}", file=sys.stderr, flush=True)
                runnable = {name: fn for name, fn in implementations(args.impl, device, causal).items()
                            if head_dim in backends.get(name, [head_dim])}
                rows += bench_shape(runnable, batch, seq_len, WIDTH // head_dim, head_dim, causal, args.mode, device,
                                    dtype, REP_MS[size])
                common.free_memory()
    if args.masks != "no":
        names = [name for name in args.impl if name in MASKED_IMPLS]
        rows += bench_masked(names, *MASKED_SHAPES[size], WIDTH // 64, 64, args.mode, device, dtype, REP_MS[size])
    match = ("mode", "mask", "causal", "B", "T", "H", "D")
    common.add_ratio(rows, "vs_sdpa", "ms", "sdpa", match)
    common.add_ratio(rows, "vs_eager", "ms", "eager", match)
    common.add_ratio(rows, "mem_vs_eager", "peak_MiB", "eager", match, speedup=False)

    settings = {
        "device": device, "dtype": dtype, "tokens per case (B x T)": tokens,
        "sdpa backend": "PyTorch's choice (named in each sdpa row's note); sdpa_flash, sdpa_cudnn: that backend only",
        "timing": "triton.testing.do_bench median, L2 flushed" if device.startswith("cuda") else "wall-clock median",
    }
    notes += [
        ("TFLOPS: FlashAttention's convention, forward 4·B·H·T²·D (halved when causal), backward 2.5x that, "
         "fwd+bwd 3.5x; eager is charged the same although it computes the masked half too."),
        ("vs_sdpa, vs_eager: that implementation's ms over this row's (above 1 = this row is faster; sdpa is SDPA's "
         "default backend); "
         "mem_vs_eager: this row's peak memory over eager's."),
        "peak_MiB: the most GPU memory allocated during one call, inputs included (for bwd, what the forward saved too).",
        ("Before timing, each output (fwd) or q/k/v gradient (bwd, fwd+bwd) is checked against float32 SDPA: error = "
         f"max |difference| / max |reference| (in the json), flagged MISMATCH above {common.TOLERANCE[dtype]:g}."),
    ]
    notes.append("Masked rows: TFLOPS counts the visible scores only (the work a kernel that skips the rest does); "
                 "tiles_pct: the share of the causal 128x64 tiles left non-empty; vs_sdpa: against SDPA with the "
                 "mask spelled out (no fast backend takes one).")
    # the plot leaves out the extra batch-1 case, which would be a second point at its T, and the masked rows
    sweep = [r for r in rows if r["B"] == max(1, tokens // r["T"]) and r["mask"] == "-"]
    draw = functools.partial(common.line_chart, rows=sweep, x="T", y="TFLOPS", series="impl",
                             panels=("mode", "causal", "D"), title=f"attention, {dtype}: TFLOPS vs T")
    common.report("attn", "Attention: eager vs SDPA (default, flash, cuDNN) vs FlexAttention vs Triton", rows, COLUMNS,
                  settings, notes, args.out, draw)
    return common.exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
