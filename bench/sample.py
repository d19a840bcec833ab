"""Sampling speed: tokens/s of model.generate_stream without the KV cache, with the exact cache, and with
the cache refilled from the last N tokens once the window is full (refill=N: faster, but inexact); and
for the same model with RoPE (pos_embedding='rope'), without the cache, with it, and with it rolling.

    python bench/sample.py                                  # on the GPU if there is one, else CPU
    python bench/sample.py --device=cpu --new_tokens 1000 --refill 128 --out bench/results
    python bench/sample.py --quick                          # a few seconds

The model is config/shakespeare.py's (6 layers, 6 heads, 384 wide, block 256, 65 characters), randomly
initialized: speed does not depend on the weights. Each sample continues a one-token prompt, at batch 1,
with the model's 'auto' attention and LayerNorm (our Triton kernels on CUDA, PyTorch's elsewhere).
With nanoGPT's semantics every token sees the last block_size tokens at positions 0..block_size-1, so
once the sequence outgrows the block the positions of the whole window shift at every step and the
exact cache must recompute all of it, like no cache at all: it only helps for the first ~block_size
tokens. refill=N restarts the cache from the last N tokens when it is full, and decodes one token per
step until it is full again; each token then sees between N and block_size tokens instead of exactly
block_size, so its output differs from the others' past block_size (the `exact` column). With RoPE the
cache can instead roll (roll=True): one token per step for good, each attending to the cached states of
the last block_size positions (sliding-window attention, exact only for a one-layer model).
"""
import functools
import runpy
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import common  # noqa: E402
from tritongpt.configurator import autocast  # noqa: E402
from tritongpt.impls import choose_impls  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

PROMPT_LEN = 1
BUDGET_S = 30.0  # fewer timed generations once a case has taken this long: no cache on CPU takes minutes
TEMPERATURE, TOP_K = 0.8, 200  # sample.py's defaults
COLUMNS = ("model", "new_tokens", "method", "exact", "s", "tok_s", "vs_nocache", "note")


def model_config(quick: bool) -> GPTConfig:
    if quick:
        return GPTConfig(block_size=64, vocab_size=65, n_layer=2, n_head=2, n_embd=64, dropout=0.0, bias=False)
    shakespeare = runpy.run_path(str(common.REPO / "config" / "shakespeare.py"))
    # vocab_size: the 65 characters of data/shakespeare_char/meta.pkl; no dropout when sampling
    sizes = {k: shakespeare[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}
    return GPTConfig(vocab_size=65, dropout=0.0, bias=False, **sizes)  # bias: train.py's default


def methods(refills: list[int], rope: bool) -> dict[str, dict]:
    """method name -> generate_stream's keyword arguments."""
    past_block = {"roll": dict(use_cache=True, roll=True)} if rope else {
        f"refill={n}": dict(use_cache=True, refill=n) for n in refills}
    return {"no cache": dict(use_cache=False), "cache": dict(use_cache=True), **past_block}


def is_exact(kwargs: dict, new_tokens: int, config: GPTConfig) -> bool:
    """Whether every token sees exactly what it would without a cache: a refill or a roll changes nothing
    until the sequence a token is sampled from outgrows the block (and a roll nothing with one layer)."""
    within_block = PROMPT_LEN + new_tokens - 1 <= config.block_size
    if kwargs.get("roll"):
        return within_block or config.n_layer == 1
    return kwargs.get("refill") is None or within_block


def generate(model: GPT, new_tokens: int, kwargs: dict, device: str, ctx) -> None:
    prompt = torch.zeros((1, PROMPT_LEN), dtype=torch.long, device=device)
    generator = torch.Generator(device).manual_seed(1337)
    with ctx:
        for _ in model.generate_stream(prompt, new_tokens, TEMPERATURE, TOP_K, generator=generator, **kwargs):
            pass


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--new_tokens", nargs="+", type=int, help="default: 1000 250 (200 50 under --quick)")
    p.add_argument("--refill", nargs="+", type=int, help="refill sizes N (default: half and 3/4 of block_size: 128 192)")
    p.add_argument("--repeats", type=int, default=3,
                   help=f"timed generations per case, fewer past {BUDGET_S:g} s; the median is kept (default: 3)")
    args = p.parse_args(argv)

    device, dtype = common.device_and_dtype(args)
    config = model_config(args.quick)
    block = config.block_size
    lengths = args.new_tokens or ([200, 50] if args.quick else [1000, 250])
    ctx = autocast(device, dtype)
    refills = args.refill or [block // 2, 3 * block // 4]
    if not all(0 < n < block for n in refills):
        p.error(f"--refill sizes must be between 1 and block_size - 1 ({block - 1})")

    rows = []
    for model_name, model_config_ in (("learned", config), ("rope", replace(config, pos_embedding="rope"))):
        torch.manual_seed(0)
        model = GPT(model_config_).to(device).eval()
        choose_impls(model, 1, device, getattr(torch, dtype), measure=False, log=lambda line: None)  # as sample.py
        cases = methods(refills, rope=model_name == "rope")
        for kwargs in cases.values():
            generate(model, 16, kwargs, device, ctx)  # warm-up: first calls allocate, and compile Triton kernels
        for new_tokens in lengths:
            for name, kwargs in cases.items():
                print(f"{model_name}: {new_tokens} tokens, {name}", file=sys.stderr, flush=True)
                run = functools.partial(generate, model, new_tokens, kwargs, device, ctx)
                ms, note = common.attempt(functools.partial(common.wall_ms, run, device, args.repeats, 0, BUDGET_S))
                rows.append({
                    "model": model_name, "new_tokens": new_tokens, "method": name,
                    "exact": is_exact(kwargs, new_tokens, model_config_), "s": ms * 1e-3 if ms else None,
                    "tok_s": new_tokens / (ms * 1e-3) if ms else None, "note": note,
                })
    common.add_ratio(rows, "vs_nocache", "s", "no cache", ("model", "new_tokens"), by="method")

    settings = {
        "device": device, "dtype": dtype, "block_size": block,
        "model": (f"{config.n_layer} layers, {config.n_head} heads, {config.n_embd} wide, "
                  f"{config.vocab_size} tokens, random init; learned position embedding or RoPE"),
        "prompt": f"{PROMPT_LEN} token, batch 1", "sampling": f"temperature {TEMPERATURE}, top_k {TOP_K}",
        "timed generations per case": f"{args.repeats}, fewer past {BUDGET_S:g} s",
    }
    notes = [
        "vs_nocache: no-cache time over this row's (above 1 = faster; at most 1/3 of the no-cache time is 3 or more).",
        ("exact: the tokens are sampled from the same distributions as without a cache; a refill or a roll is "
         f"inexact once the sequence outgrows block_size ({block}) (a roll is exact with one layer)."),
        "s: wall-clock seconds for the whole generation, device synchronized (median over the timed generations).",
    ]
    for new_tokens in lengths:
        summary = ", ".join(f"{r['model']} {r['method']} {r['vs_nocache']:.2f}x" for r in rows
                            if r["new_tokens"] == new_tokens and r["vs_nocache"] and r["method"] != "no cache")
        notes.append(f"{new_tokens} new tokens, speed over no cache (same model): {summary or '-'}")
    draw = functools.partial(common.bar_chart, rows=rows, labels=("model", "method"), y="tok_s", panels=("new_tokens",),
                             title=f"sampling, {config.n_layer} layers x {config.n_embd}, block {block}: tokens/s")
    common.report("sample", "Sampling: no cache vs KV cache vs refilled cache", rows, COLUMNS, settings, notes,
                  args.out, draw)
    return common.exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
