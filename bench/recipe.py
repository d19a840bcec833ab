"""The GPT-2 recipe against the modern one, on the same model size, data and wall-clock budget: which learns
faster. Each recipe trains with train.py's own functions (loop.train_step, loop.estimate_loss, optim), one
after the other in this invocation, so all see the same machine; the clock stops during evals.

    python bench/recipe.py --ablation --out bench/results/recipe/cpu   # CPU: the quickstart's model and data
    python bench/recipe.py --budget 120                               # a longer run each
    python bench/recipe.py --quick                                  # a few seconds

Recipes are train.py configs: `gpt2` is config/shakespeare_cpu_gpt2.py (the quickstart's model, data and
steps with GPT-2's recipe and AdamW); `modern` is config/shakespeare_cpu.py, the quickstart itself (every
switch on but the untied head, which does not pay at this size; Muon). An ablation adds GPT-2 plus one switch (learning rates as GPT-2's, Muon's its own).
Each recipe gets the same wall-clock budget: its schedule (warmup, then cosine decay to min_lr) is fitted
to the number of steps the budget holds at the pace of its first steps, so a slower step means fewer steps.
Needs data/shakespeare_char (python prepare/shakespeare_char.py).
"""
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import common  # noqa: E402
from tritongpt.configurator import autocast, script_config  # noqa: E402
from tritongpt.data import TokenSplit  # noqa: E402
from model import GPT, SWITCHES, GPTConfig  # noqa: E402
from tritongpt.optim import optimizer_for, set_lr  # noqa: E402
from tritongpt.data import Batches  # noqa: E402
from tritongpt.loop import estimate_loss, train_step  # noqa: E402
from tritongpt.optim import get_lr  # noqa: E402

TRAIN = common.REPO / "train.py"
BASE_CONFIG = common.REPO / "config" / "shakespeare_cpu_gpt2.py"
MODERN_CONFIG = common.REPO / "config" / "shakespeare_cpu.py"
# one switch at a time on top of GPT-2: (name, train.py overrides)
ABLATIONS = {
    "+rope": ["--pos_embedding=rope"], "+rmsnorm": ["--norm=rmsnorm"], "+qk_norm": ["--qk_norm=True"],
    "+relu2": ["--activation=relu2"], "+untied": ["--tie_embeddings=False"], "+softcap": ["--logit_softcap=15.0"],
    "+zero_init": ["--zero_init_proj=True"], "+muon": ["--optimizer=muon"],
}
QUICK = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--batch_size=4", "--block_size=32", "--eval_interval=20",
         "--eval_iters=2", "--warmup_iters=2"]
COLUMNS = ("recipe", "steps", "seconds", "tokens_M", "val_loss", "s_to_target", "steps_to_target", "vs_gpt2")
CALIBRATION_STEPS = 10  # timed before the schedule is fitted to the budget


def recipes(ablation: bool, quick: bool) -> dict[str, dict]:
    """name -> train.py config (config files and overrides applied)."""
    extra = QUICK if quick else ["--eval_interval=50"]  # a curve, not just the two ends
    chosen = {"gpt2": [str(BASE_CONFIG)], "modern": [str(MODERN_CONFIG)]}
    if ablation:
        chosen.update({name: [str(BASE_CONFIG), *overrides] for name, overrides in ABLATIONS.items()})
    return {name: script_config(TRAIN, [*arguments, *extra]) for name, arguments in chosen.items()}


def run_recipe(config: dict, budget_s: float | None, device: str, dtype: str, data_dir: Path,
               steps: int | None = None) -> list[dict]:
    """Train one recipe for `budget_s` seconds (or a fixed number of `steps`); the evals: [{step, seconds,
    tokens, val_loss}], seconds excluding eval time. The schedule is fitted to the budget: after
    CALIBRATION_STEPS steps at the warmup's learning rates, max_iters (and lr_decay_iters) become the steps
    the budget holds at that pace, so every recipe decays its learning rate fully within the same
    wall-clock time."""
    torch.manual_seed(config["seed"])
    splits = {s: TokenSplit(data_dir, s) for s in ("train", "val")}
    vocab = 65 if data_dir.name == "shakespeare_char" else 50304
    model = GPT(GPTConfig.from_dict({**config, "vocab_size": vocab})).to(device)
    device_type = device.split(":")[0]
    opt = optimizer_for(model, config, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    ctx = autocast(device, dtype)
    batches = Batches(splits, config["batch_size"], config["block_size"], torch.device(device), config["seed"])
    tokens_per_step = config["batch_size"] * config["block_size"] * config["gradient_accumulation_steps"]
    evals, seconds, step, max_iters = [], 0.0, 0, steps
    schedule = {k: config[k] for k in ("learning_rate", "warmup_iters", "min_lr", "decay_lr")}
    while True:
        if step == CALIBRATION_STEPS and steps is None:
            max_iters = max(step + 1, int(budget_s / (seconds / step)))
        finished = max_iters is not None and step >= max_iters
        if step % config["eval_interval"] == 0 or finished:
            val = estimate_loss(model, batches.eval, config["eval_iters"], ctx, splits=("val",))["val"]
            evals.append({"step": step, "seconds": seconds, "tokens": step * tokens_per_step, "val_loss": val})
        if finished:
            return evals
        lr = get_lr(step, lr_decay_iters=max_iters or 10**9, **schedule)
        set_lr(opt, lr, config["learning_rate"], config["muon_lr"])
        start = time.perf_counter()
        loss = train_step(model, opt, scaler, functools.partial(batches.train, step),
                          config["gradient_accumulation_steps"], config["grad_clip"], ctx)
        loss.item()  # wait for the device: the clock measures finished work
        seconds += time.perf_counter() - start
        step += 1


def summarize(name: str, evals: list[dict], target: float) -> dict:
    """A recipe's row: where it ended, and when it first reached `target` (GPT-2's final val loss)."""
    last = evals[-1]
    reached = next((e for e in evals if e["val_loss"] <= target), None)
    return {"recipe": name, "steps": last["step"], "seconds": last["seconds"], "tokens_M": last["tokens"] / 1e6,
            "val_loss": last["val_loss"], "s_to_target": reached["seconds"] if reached else None,
            "steps_to_target": reached["step"] if reached else None}


def draw_curves(plt, curves: dict[str, list[dict]], title: str):
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, x, label in ((axes[0], "seconds", "training seconds (evals excluded)"), (axes[1], "tokens", "tokens")):
        for name, evals in curves.items():
            ax.plot([e[x] for e in evals], [e["val_loss"] for e in evals], marker=".",
                    linewidth=2.2 if name in ("gpt2", "modern") else 1.0, label=name)
        ax.set_xlabel(label)
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--budget", type=float, default=45.0, help="seconds of training per recipe (default 45)")
    p.add_argument("--ablation", action="store_true", help="also GPT-2 plus each switch alone")
    p.add_argument("--data_dir", type=Path, default=Path("data/shakespeare_char"))
    args = p.parse_args(argv)
    device, dtype = common.device_and_dtype(args)
    budget = 0.5 if args.quick else args.budget
    configs = recipes(args.ablation, args.quick)
    curves = {}
    for name, config in configs.items():
        print(f"{name}: training for up to {budget:g} s", file=sys.stderr, flush=True)
        curves[name] = run_recipe(config, budget, device, dtype, args.data_dir)
    target = curves["gpt2"][-1]["val_loss"]
    rows = [summarize(name, evals, target) for name, evals in curves.items()]
    for row in rows:
        row["vs_gpt2"] = (rows[0]["s_to_target"] / row["s_to_target"]) if row["s_to_target"] else None
    base = configs["gpt2"]
    settings = {
        "device": device, "dtype": dtype, "budget (s)": budget, "data": str(args.data_dir),
        "model": f"{base['n_layer']} layers, {base['n_head']} heads, {base['n_embd']} wide, block {base['block_size']}",
        "batch": f"{base['batch_size']} x {base['gradient_accumulation_steps']} micro-batches",
        "modern": ", ".join(f"{k}={configs['modern'][k]}" for k in (*SWITCHES, "optimizer", "learning_rate", "muon_lr")),
    }
    notes = [
        f"target: the gpt2 recipe's final val loss ({target:.4f}); s_to_target, steps_to_target: the first eval at or "
        "below it (evals every eval_interval steps, so these are upper bounds at that resolution).",
        "vs_gpt2: the gpt2 recipe's seconds to the target over this recipe's (above 1: faster).",
        (f"seconds: training time, evals excluded; each recipe's schedule is fitted to the budget after "
         f"{CALIBRATION_STEPS} timed steps, so it ends near the budget with its learning rate decayed."),
    ]
    draw = functools.partial(draw_curves, curves=curves, title=f"val loss, {settings['model']} ({device})")
    common.report("recipe", "The GPT-2 recipe vs the modern recipe, same model size and budget", rows, COLUMNS,
                  settings, notes, args.out, draw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
