"""Attention: how much faster and leaner is our Triton FlashAttention than what you would write by hand,
and than what PyTorch ships?

    python bench/attn.py                                  # the full sweep, on the GPU, in bfloat16
    python bench/attn.py --dtype=float16 --causal=yes --mode fwd+bwd --out bench/results
    python bench/attn.py --quick                          # a few seconds, on CPU too

Implementations: `eager` (q @ k^T, mask, softmax, @ v: model.attention's 'eager'), `sdpa`
(F.scaled_dot_product_attention as a user gets it: PyTorch's choice of backend, named in each row's note;
on an H100/H200 with torch 2.11 that is cuDNN), `sdpa_flash` and `sdpa_cudnn` (SDPA restricted to its
FlashAttention-2 or its cuDNN backend, where they run), `flex` (torch.nn.attention.flex_attention,
compiled, with a causal block mask; CUDA only: it has no backward on CPU) and `triton`
(kernels/flash_attention.py; CUDA only). vs_sdpa compares with the default. Every case holds 16k tokens, batch x T = 16384 for T
from 512 to 16384 (so batch 1 at the longest T), with GPT-2's 12 heads of 64 and with 6 heads of 128
(the same width, 768). q, k and v are views of one (B, T, 3, H, D) tensor, as the model makes them.
Without CUDA the sweep is smaller (T up to 1024, 2048 tokens) and the Triton rows are skipped.
"""
import functools
import math
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import model  # noqa: E402
from impls import sdpa_backend  # noqa: E402
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
COLUMNS = ("impl", "mode", "causal", "B", "T", "H", "D", "ms", "TFLOPS", "peak_MiB",
           "vs_sdpa", "vs_eager", "mem_vs_eager", "note")


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
        return model.attention(q, k, v, "eager", 0.0)
    # model.attention is causal only; this is its eager path without the mask
    return F.softmax((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1))), dim=-1) @ v


def sdpa(q, k, v, causal: bool):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def sdpa_with(backend: SDPBackend):
    """SDPA restricted to one backend (the backward runs the same backend's kernel)."""
    def restricted(q, k, v, causal: bool):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return restricted


@functools.cache
def causal_block_mask(seq_len: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, seq_len, seq_len, device=device)


@functools.cache
def compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex(q, k, v, causal: bool):
    """PyTorch's own block-sparse attention: compiled FlexAttention, skipping the masked half when causal."""
    return compiled_flex()(q, k, v, block_mask=causal_block_mask(q.size(-2), str(q.device)) if causal else None)


def implementations(names: list[str], device: str) -> dict:
    fns = {"eager": eager, "sdpa": sdpa, **{name: sdpa_with(backend) for name, backend in SDPA_BACKENDS.items()}}
    if device.startswith("cuda"):
        from kernels.flash_attention import flash_attention  # imported here: runs without CUDA need no Triton

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
                "impl": name, "mode": mode, "causal": causal, "B": batch, "T": seq_len, "H": heads, "D": head_dim,
                "ms": ms, "TFLOPS": flops / (ms * 1e-3) / 1e12 if ms else None, "peak_MiB": peak,
                "error": error, "note": note,
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    p.add_argument("--head_dim", nargs="+", type=int, help="D values, with 768 // D heads (default: 64 128)")
    p.add_argument("--seq_len", nargs="+", type=int, help="T values (default: 512 to 16384 on GPU)")
    p.add_argument("--tokens", type=int, help="batch x T of every case (default: 16384 on GPU)")
    args = p.parse_args(argv)

    device, dtype = common.device_and_dtype(args)
    size = common.sweep_size(args, device)
    seq_lens = args.seq_len or list(SEQ_LENS[size])
    tokens = args.tokens or TOKENS[size]
    head_dims = args.head_dim or list(HEAD_DIMS[size])
    causals = {"both": (True, False), "yes": (True,), "no": (False,)}[args.causal]
    impls = implementations(args.impl, device)
    notes = []
    why_not = {"flex": "FlexAttention needs a CUDA GPU here (it has no backward on CPU)",
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
    for head_dim in head_dims:
        for causal in causals:
            for batch, seq_len in attention_shapes(seq_lens, tokens):
                print(f"D={head_dim} causal={causal} B={batch} T={seq_len}", file=sys.stderr, flush=True)
                runnable = {name: fn for name, fn in impls.items() if head_dim in backends.get(name, [head_dim])}
                rows += bench_shape(runnable, batch, seq_len, WIDTH // head_dim, head_dim, causal, args.mode, device,
                                    dtype, REP_MS[size])
                common.free_memory()
    match = ("mode", "causal", "B", "T", "H", "D")
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
    # the plot leaves out the extra batch-1 case, which would be a second point at its T
    sweep = [r for r in rows if r["B"] == max(1, tokens // r["T"])]
    draw = functools.partial(common.line_chart, rows=sweep, x="T", y="TFLOPS", series="impl",
                             panels=("mode", "causal", "D"), title=f"attention, {dtype}: TFLOPS vs T")
    common.report("attn", "Attention: eager vs SDPA (default, flash, cuDNN) vs FlexAttention vs Triton", rows, COLUMNS,
                  settings, notes, args.out, draw)
    return common.exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
