"""Document masking and sliding windows: what they do to learning, measured on a multi-document corpus that
every machine has without a download, the Python standard library's own modules (one document per file,
GPT-2 BPE, made by prepare/text.py). The same model trains the same steps with train.py's functions
(bench/recipe.py's loop) once per variant, and each is evaluated as it trains, with its own attention:

- causal: nanoGPT's packed rows, every token attending to everything before it, other files included;
- documents: doc_token=50256, each token attends within its own file only;
- documents + positions: the same, and positions restart at each file (doc_positions);
- documents + window: the same as documents, and each token sees only its last --window tokens.

    python bench/documents.py --out bench/results/documents/cpu
    python bench/documents.py --quick          # a few seconds: a handful of modules, a tiny model

The corpus goes to --data_dir (default data/python_stdlib), made on first use. All variants score the same
val batches (the same targets); a masked variant predicts each file's first tokens from less context, so its
val loss is a slightly harder task, not the same number on an easier one.
"""
import functools
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common, recipe  # noqa: E402
from tritongpt.configurator import script_config  # noqa: E402

GPT2_EOT = 50256
MODEL = ["--n_layer=2", "--n_head=4", "--n_embd=128", "--block_size=256", "--batch_size=4", "--dropout=0.0",
         "--gradient_accumulation_steps=1", "--learning_rate=1e-3", "--min_lr=1e-4", "--warmup_iters=20",
         "--eval_iters=20", "--eval_interval=40", "--bias=False"]
QUICK = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=2", "--eval_iters=2",
         "--eval_interval=5", "--warmup_iters=2"]
COLUMNS = ("variant", "steps", "seconds", "val_loss", "vs_causal_seconds")


def variants(window: int) -> dict[str, list[str]]:
    return {
        "causal": [],
        "documents": [f"--doc_token={GPT2_EOT}"],
        "documents + positions": [f"--doc_token={GPT2_EOT}", "--doc_positions=True"],
        f"documents + window {window}": [f"--doc_token={GPT2_EOT}", f"--attn_window={window}"],
    }


def make_corpus(data_dir: Path, quick: bool) -> None:
    """data_dir's train.bin and val.bin from the standard library's top-level modules, one document each."""
    if (data_dir / "train.bin").exists():
        return
    pattern = str(Path(sysconfig.get_paths()["stdlib"]) / ("a*.py" if quick else "*.py"))
    command = [sys.executable, str(common.REPO / "prepare" / "text.py"), "--name", data_dir.name, "--input", pattern,
               "--tokenizer", "gpt2", "--data_dir", str(data_dir)]
    print(" ".join(command), file=sys.stderr, flush=True)
    if subprocess.run(command).returncode:
        sys.exit(f"error: could not make the corpus in {data_dir} (prepare/text.py's message is above)")


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=240, help="training steps per variant (default 240)")
    p.add_argument("--window", type=int, default=64, help="the windowed variant's attn_window (default 64)")
    p.add_argument("--data_dir", type=Path, default=Path("data/python_stdlib"))
    args = p.parse_args(argv)
    device, dtype = common.device_and_dtype(args)
    steps = 10 if args.quick else args.steps
    data_dir = args.data_dir if not args.quick or args.data_dir != Path("data/python_stdlib") \
        else Path("data/python_stdlib_quick")
    make_corpus(data_dir, args.quick)
    model_args = MODEL + (QUICK if args.quick else [])
    curves, rows = {}, []
    for name, overrides in variants(min(args.window, 16) if args.quick else args.window).items():
        config = script_config(recipe.TRAIN, [*model_args, *overrides])
        print(f"{name}: {steps} steps", file=sys.stderr, flush=True)
        start = time.perf_counter()
        curves[name] = recipe.run_recipe(config, None, device, dtype, data_dir, steps=steps)
        last = curves[name][-1]
        rows.append({"variant": name, "steps": last["step"], "seconds": last["seconds"], "val_loss": last["val_loss"],
                     "wall_s": time.perf_counter() - start})
    for row in rows:
        row["vs_causal_seconds"] = rows[0]["seconds"] / row["seconds"] if row["seconds"] else None
    config = script_config(recipe.TRAIN, model_args)
    settings = {
        "device": device, "dtype": dtype, "corpus": f"{data_dir} (the standard library's modules, GPT-2 BPE)",
        "model": f"{config['n_layer']} layers, {config['n_head']} heads, {config['n_embd']} wide, "
                 f"block {config['block_size']}, batch {config['batch_size']}",
        "steps": steps, "schedule": f"AdamW {config['learning_rate']}, warmup {config['warmup_iters']}, cosine to "
                                    f"{config['min_lr']} at the last step",
    }
    notes = [
        "val_loss: each variant evaluated with its own attention (documents: within each file) on the same val batches.",
        "seconds: training time, evals excluded; vs_causal_seconds: causal's seconds over this row's (above 1: faster).",
        "On CPU attention runs PyTorch's SDPA with an explicit mask for the masked variants (no tiles skipped): their "
        "time here says nothing of the Triton kernel's on a GPU.",
    ]
    draw = functools.partial(recipe.draw_curves, curves=curves, title=f"val loss, {settings['model']} ({device})")
    common.report("documents", "Document masking and windows on the standard library's modules", rows, COLUMNS,
                  settings, notes, args.out, draw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
