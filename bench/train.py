"""Training throughput: tokens/s, MFU and peak memory of a whole training step (forward, backward,
gradient clipping, AdamW) for each attention/LayerNorm implementation, with and without torch.compile.

    python bench/train.py                                   # GPT-2 124M and shakespeare_char, on the GPU
    python bench/train.py --model gpt2 --compile on --out bench/results
    python bench/train.py --quick                           # a few seconds, on CPU too

Models: `gpt2` (GPT-2 124M, block 1024, micro-batch 12: train.py's defaults, like nanoGPT's bench),
`shakespeare_char` (config/shakespeare.py: 6 layers, 6 heads, 384 wide, block 256, batch 64) and
`tiny` (for --quick). The models, batch sizes and optimizer settings are train.py's defaults (with the
config file, for shakespeare_char), read from train.py itself; each step is loop.train_step, the
function train.py runs. Implementations: `eager` (hand-written attention, torch LayerNorm), `sdpa`
(F.scaled_dot_product_attention, torch LayerNorm), `triton` (our attention and LayerNorm kernels) and
`triton+ce` (those and the fused linear cross-entropy); the last two CUDA only; every other row computes
the loss with F.cross_entropy. Batches are random tokens, fixed for the run: throughput does not depend on the data.
Each step is one micro-batch and one optimizer step; train.py accumulates gradients over several
micro-batches per optimizer step, so there the optimizer's (constant) share of the time is smaller.
Without CUDA the default is shakespeare_char at batch 4.
"""
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import common  # noqa: E402
from tritongpt.configurator import autocast, script_config  # noqa: E402
from tritongpt.metrics import gpu_peak_flops  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tritongpt.optim import optimizer_for  # noqa: E402
from tritongpt.loop import train_step  # noqa: E402

# impl -> (attn_impl, ln_impl, ce_impl) of the model
IMPLS = {"eager": ("eager", "torch", "torch"), "sdpa": ("sdpa", "torch", "torch"),
         "triton": ("triton", "triton", "torch"), "triton+ce": ("triton", "triton", "triton")}
TRAIN_SCRIPT = common.REPO / "train.py"
# name -> train.py's arguments for it
MODELS = {
    "gpt2": [],  # train.py's defaults are GPT-2 124M
    "shakespeare_char": [str(common.REPO / "config" / "shakespeare.py")],
    "tiny": ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=4"],
}
VOCAB_SIZES = {"gpt2": 50304, "shakespeare_char": 65, "tiny": 65}  # 65: data/shakespeare_char's characters
CPU_BATCH_SIZE = 4
COLUMNS = ("model", "impl", "compile", "B", "T", "ms", "tok_s", "MFU_pct", "peak_MiB", "vs_sdpa", "vs_eager", "note")


def train_config(name: str) -> dict:
    return script_config(TRAIN_SCRIPT, MODELS[name])


def model_config(config: dict, vocab_size: int) -> GPTConfig:
    return GPTConfig.from_dict({**config, "vocab_size": vocab_size})


def tokens_per_s(batch: int, block_size: int, ms: float) -> float:
    return batch * block_size / (ms * 1e-3)


def bench_step(config: dict, model_cfg: GPTConfig, batch: int, impl: str, use_compile: bool, device: str,
               dtype: str, steps: int, warmup: int) -> tuple[float, float | None, float | None]:
    """(ms per step, MFU %, peak MiB) of train.py's training step on one fixed random batch, with train.py's
    optimizer settings and one micro-batch per step."""
    torch.manual_seed(0)
    model = GPT(model_cfg).to(device)
    model.set_impl(*IMPLS[impl])
    device_type = device.split(":")[0]
    optimizer = optimizer_for(model, config, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")  # fp16 needs loss scaling
    ctx = autocast(device, dtype)
    forward = torch.compile(model) if use_compile else model
    x, y = torch.randint(model_cfg.vocab_size, (2, batch, model_cfg.block_size), device=device)

    def step():
        train_step(forward, optimizer, scaler, lambda i: (x, y), 1, config["grad_clip"], ctx)

    ms = common.wall_ms(step, device, runs=steps, warmup=warmup)  # warm-up steps compile, when compiling
    mfu = model.estimate_mfu(batch, ms * 1e-3, gpu_peak_flops(device, dtype))
    return ms, None if mfu is None else 100 * mfu, common.peak_mib(step, device)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--model", nargs="+", choices=list(MODELS), help="default: gpt2 shakespeare_char on GPU")
    p.add_argument("--impl", nargs="+", choices=list(IMPLS), default=list(IMPLS))
    p.add_argument("--compile", choices=("both", "on", "off"), help="torch.compile the model (default: both; quick: off)")
    p.add_argument("--batch_size", type=int, help="micro-batch size (default: the model's on GPU, 4 on CPU)")
    p.add_argument("--steps", type=int, help="timed steps, after the warm-up ones (default: 20 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps first, where compilation happens (default: 3; quick: 1)")
    args = p.parse_args(argv)

    device, dtype = common.device_and_dtype(args)
    gpu = device.startswith("cuda")
    models = args.model or (["tiny"] if args.quick else ["gpt2", "shakespeare_char"] if gpu else ["shakespeare_char"])
    compiles = {"both": (False, True), "on": (True,), "off": (False,)}[args.compile or ("off" if args.quick else "both")]
    steps = args.steps or (2 if args.quick else 20 if gpu else 3)
    warmup = args.warmup or (1 if args.quick else 3)
    impls = [name for name in args.impl if gpu or not name.startswith("triton")]
    notes = []
    if len(impls) < len(args.impl):
        notes.append("triton: not run; the Triton kernels need a CUDA GPU")
        print(notes[-1], file=sys.stderr)

    rows = []
    for name in models:
        config = train_config(name)
        model_cfg = model_config(config, VOCAB_SIZES[name])
        model_batch = config["batch_size"]
        batch = args.batch_size or (model_batch if gpu else min(model_batch, CPU_BATCH_SIZE))
        for use_compile in compiles:
            for impl in impls:
                print(f"{name} {impl} compile={use_compile}", file=sys.stderr, flush=True)
                # Drop earlier compiled models, which dynamo's caches can keep alive (and count in peak_MiB),
                # and keep clear of its recompile limit.
                torch._dynamo.reset()
                case = functools.partial(bench_step, config, model_cfg, batch, impl, use_compile, device, dtype, steps, warmup)
                result, note = common.attempt(case)
                ms, mfu, peak = result or (None, None, None)
                rows.append({
                    "model": name, "impl": impl, "compile": use_compile, "B": batch, "T": model_cfg.block_size, "ms": ms,
                    "tok_s": tokens_per_s(batch, model_cfg.block_size, ms) if ms else None, "MFU_pct": mfu,
                    "peak_MiB": peak, "note": note,
                })
                common.free_memory()
    common.add_ratio(rows, "vs_sdpa", "tok_s", "sdpa", ("model", "compile"), speedup=False)
    common.add_ratio(rows, "vs_eager", "tok_s", "eager", ("model", "compile"), speedup=False)

    peak = gpu_peak_flops(device, dtype)
    settings = {
        "device": device, "dtype": dtype, "timed steps": steps, "warm-up steps": warmup,
        "GPU peak (TFLOPS)": None if peak is None else peak / 1e12,
        "timing": "wall-clock median per step, synchronized",
    }
    notes += [
        ("A step: loop.train_step, as train.py runs it: forward and loss under autocast, backward, gradient "
         "clipping and AdamW (train.py's settings; fused where PyTorch has it), on one batch of random tokens."),
        ("MFU_pct: model.estimate_mfu (PaLM's 6N + 12·L·H·Q·T FLOPs per token) over the GPU's dense bf16/fp16 "
         "peak in metrics.GPU_PEAK_FLOPS; none on CPU, in float32 or on an unlisted GPU."),
        "vs_sdpa, vs_eager: this row's tokens/s over that implementation's, same model and compile setting.",
        "peak_MiB: the most GPU memory allocated during one step (weights, gradients and AdamW state included).",
    ]
    draw = functools.partial(common.bar_chart, rows=rows, labels=("impl", "compile"), y="tok_s", panels=("model",),
                             title=f"training step, {dtype}: tokens/s")
    common.report("train", "Training step: attention/LayerNorm implementations x torch.compile", rows, COLUMNS,
                  settings, notes, args.out, draw)
    return common.exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
