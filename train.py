"""
Train a GPT: on one CPU or GPU,

$ python train.py config/shakespeare.py --batch_size=32

or with DDP on several GPUs of one node (or several CPU processes, with gloo),

$ torchrun --standalone --nproc_per_node=8 train.py config/shakespeare.py

and across nodes (run on each, with the master's address):

$ torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 train.py

The config keys, defaults, command lines, data files and checkpoints are nanoGPT's.
"""
import json
import math
import os
import time

import numpy as np
import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import autocast, configure, resolve_compile, resolve_device, resolve_dtype
from data import TokenSplit, atomic_open, load_meta
from model import GPT, GPTConfig, gelu_approximate, gpu_peak_flops, model_from_checkpoint

# -----------------------------------------------------------------------------
# default config values: GPT-2 (124M) on OpenWebText, as in nanoGPT
# I/O
out_dir = "out"
eval_interval = 2000
log_interval = 1
eval_iters = 200
eval_only = False  # if True, exit right after the first eval
always_save_checkpoint = True  # if True, save a checkpoint after every eval, not only on a new best
init_from = "scratch"  # 'scratch', 'resume' (from out_dir), a GPT-2 name ('gpt2', 'gpt2-xl') or an HF model dir
# wandb logging
wandb_log = False
wandb_project = "owt"
wandb_run_name = "gpt2"
# data
dataset = "openwebtext"
data_dir: str | None = None  # default: data/<dataset>
gradient_accumulation_steps = 5 * 8  # used to simulate larger batch sizes
batch_size = 12  # micro-batch size; with accumulation and DDP the batch is bigger
block_size = 1024
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # 0 for pretraining, try 0.1+ for finetuning
bias = False  # biases inside LayerNorm and Linear layers?
attn_impl = "auto"  # 'auto', 'eager', 'sdpa' or 'triton'
ln_impl = "auto"  # 'auto', 'torch' or 'triton'
# adamw optimizer
learning_rate = 6e-4  # max learning rate
max_iters = 600000  # total number of training iterations
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip gradients at this value, or disable if == 0.0
# learning rate decay settings
decay_lr = True  # whether to decay the learning rate
warmup_iters = 2000  # how many steps to warm up for
lr_decay_iters = 600000  # should be ~= max_iters per Chinchilla
min_lr = 6e-5  # minimum learning rate, should be ~= learning_rate/10 per Chinchilla
# system
backend = "nccl"  # 'nccl', 'gloo', etc.; CPU runs always use gloo
device = "auto"  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto', 'float32', 'bfloat16' or 'float16' (the latter with a GradScaler)
compile: bool | str = "auto"  # torch.compile the model; 'auto' compiles on CUDA only
seed = 1337
torch_threads = 0  # CPU threads for torch; 0 keeps torch's default
# -----------------------------------------------------------------------------
config = configure(globals())
# -----------------------------------------------------------------------------


def get_lr(it: int) -> float:
    """Linear warmup, then cosine decay down to min_lr at lr_decay_iters, then min_lr."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


def batch_seed(*parts: int) -> int:
    """A seed for one batch, a pure function of (seed, stream, step, index), with stream 0 for training and
    1, 2 for the eval splits: the data stream is the same whatever the number of processes, and a resumed
    run draws exactly the batches it would have drawn."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


def get_batch(split: str, *seed_parts: int):
    generator = torch.Generator().manual_seed(batch_seed(*seed_parts))
    x, y = splits[split].get_batch(batch_size, block_size, generator)
    if device_type == "cuda":
        # pinned memory lets the copy to the GPU run asynchronously (non_blocking)
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


@torch.no_grad()
def estimate_loss() -> dict[str, float]:
    """Mean loss over eval_iters batches of each split; the same batches at every eval, so evals compare."""
    model.eval()
    out = {}
    for split_index, split in enumerate(("train", "val")):
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            x, y = get_batch(split, seed, 1 + split_index, k)
            with ctx:
                _, loss = model(x, y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def stop_diverged(what: str) -> None:
    raise SystemExit(
        f"error: {what}: training diverged. Nothing more is saved, so {out_dir}/ckpt.pt keeps the last good "
        "weights; lower learning_rate, raise warmup_iters or set grad_clip, then continue with --init_from=resume."
    )


def log_metrics(record: dict) -> None:
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def format_eta(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


# -----------------------------------------------------------------------------
# processes and devices
ddp = int(os.environ.get("RANK", -1)) != -1  # is this a torchrun run?
device = resolve_device(device)
if ddp:
    ddp_rank = int(os.environ["RANK"])
    ddp_local_rank = int(os.environ["LOCAL_RANK"])
    ddp_world_size = int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{ddp_local_rank}"
        torch.cuda.set_device(device)
    init_process_group(backend=backend if device.startswith("cuda") else "gloo")
    master_process = ddp_rank == 0  # logs, evaluates and saves
    if gradient_accumulation_steps % ddp_world_size != 0:
        raise SystemExit(
            f"error: gradient_accumulation_steps={gradient_accumulation_steps} is not divisible by the "
            f"{ddp_world_size} processes; pick a multiple of {ddp_world_size} so the global batch stays the same"
        )
    gradient_accumulation_steps //= ddp_world_size
else:
    ddp_rank, ddp_world_size, master_process = 0, 1, True
device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
dtype = resolve_dtype(dtype, device)
compile = resolve_compile(compile, device)
if torch_threads > 0:
    torch.set_num_threads(torch_threads)
tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size
if master_process:
    os.makedirs(out_dir, exist_ok=True)
    print(f"device {device}, dtype {dtype}, compile {compile}, {ddp_world_size} process(es)")
    print(f"tokens per iteration will be: {tokens_per_iter:,}")
torch.manual_seed(seed + ddp_rank)  # dropout differs per rank; DDP broadcasts rank 0's initial weights
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
ctx = autocast(device, dtype)

# data
data_dir = data_dir or os.path.join("data", dataset)
meta = load_meta(data_dir)
meta_vocab_size = meta["vocab_size"] if meta else None
if meta_vocab_size is not None and master_process:
    print(f"found vocab_size = {meta_vocab_size} (inside {os.path.join(data_dir, 'meta.pkl')})")

# model
iter_num = 0
best_val_loss = 1e9
checkpoint = None
model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias, vocab_size=None, dropout=dropout)
if init_from == "scratch":
    model_args["vocab_size"] = meta_vocab_size if meta_vocab_size is not None else 50304
    model = GPT(GPTConfig(**model_args), attn_impl, ln_impl)
elif init_from == "resume":
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(ckpt_path):
        raise SystemExit(f"error: init_from='resume' but {ckpt_path} does not exist; train with init_from='scratch' first")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    # the architecture comes from the checkpoint; dropout may be changed on resume
    for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size"):
        model_args[k] = checkpoint["model_args"][k]
    model = model_from_checkpoint({**checkpoint, "model_args": model_args}, attn_impl, ln_impl)
    iter_num = checkpoint["iter_num"]
    best_val_loss = checkpoint["best_val_loss"]
else:
    model = GPT.from_pretrained(init_from, dict(dropout=dropout), attn_impl=attn_impl, ln_impl=ln_impl)
    for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size"):
        model_args[k] = getattr(model.config, k)
if block_size < model.config.block_size:
    model.crop_block_size(block_size)
    model_args["block_size"] = block_size
elif block_size > model.config.block_size:
    raise SystemExit(f"error: block_size={block_size} is larger than the model's {model.config.block_size}")
model.to(device)

splits = {split: TokenSplit(data_dir, split, dataset, model_args["vocab_size"]) for split in ("train", "val")}

# fp16 needs loss scaling to keep small gradients from underflowing; elsewhere the scaler is a no-op
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint["optimizer"])
    if "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])
    rng = checkpoint.get("rng")
    if rng is not None and rng["world_size"] == ddp_world_size:
        torch.set_rng_state(rng["torch"][ddp_rank])
        if device_type == "cuda" and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"][ddp_rank], device)
checkpoint = None  # free the memory

raw_model = model  # the plain module: what gets saved, and what estimate_mfu is asked
if compile:
    if master_process:
        print("compiling the model... (takes a ~minute)")
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == "cuda" else None)

if wandb_log and master_process:
    import wandb

    wandb.init(project=wandb_project, name=wandb_run_name, config=config)


def gather_rng_states() -> dict:
    """Every rank's RNG states (dropout differs per rank), collected on rank 0 for the checkpoint."""
    states = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device_type == "cuda" else None}
    gathered = [states]
    if ddp:
        gathered = [None] * ddp_world_size
        torch.distributed.all_gather_object(gathered, states)
    return {
        "world_size": ddp_world_size,
        "torch": [s["torch"] for s in gathered],
        "cuda": [s["cuda"] for s in gathered] if device_type == "cuda" else None,
    }


# -----------------------------------------------------------------------------
# training loop
peak_flops = gpu_peak_flops(device, dtype)
t0 = time.time()
start_iter = iter_num
local_iter_num = 0  # iterations in this process's lifetime
running_mfu = -1.0
running_dt = None
while True:
    lr = get_lr(iter_num)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr

    if iter_num % eval_interval == 0 or eval_only:
        # every rank takes part in gathering the RNG states; nothing is saved before the first step
        rng_states = gather_rng_states() if iter_num > 0 and not eval_only else None
        if master_process:
            losses = estimate_loss()
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            log_metrics({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"], "lr": lr})
            if wandb_log:
                wandb.log({"iter": iter_num, "train/loss": losses["train"], "val/loss": losses["val"], "lr": lr})
            if not (math.isfinite(losses["train"]) and math.isfinite(losses["val"])):
                stop_diverged(f"the eval loss is {losses['val']} at step {iter_num}")
            improved = losses["val"] < best_val_loss
            best_val_loss = min(best_val_loss, losses["val"])
            if (improved or always_save_checkpoint) and rng_states is not None:
                ckpt_path = os.path.join(out_dir, "ckpt.pt")
                print(f"saving checkpoint to {out_dir}")
                state = {
                    "model": raw_model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "model_args": model_args,
                    "iter_num": iter_num,
                    "best_val_loss": best_val_loss,
                    "config": config,
                    "scaler": scaler.state_dict(),
                    "rng": rng_states,
                    "gelu_approximate": gelu_approximate(raw_model),
                }
                # a temp file renamed over the old one: a run killed at any moment leaves either the
                # old checkpoint or the new one, never a torn file
                with atomic_open(ckpt_path) as f:
                    torch.save(state, f)
    if eval_only:
        break

    # forward backward update, with gradient accumulation to simulate a larger batch
    loss_sum = torch.zeros((), device=device)
    first_micro = ddp_rank * gradient_accumulation_steps
    x, y = get_batch("train", seed, 0, iter_num, first_micro)
    for micro_step in range(gradient_accumulation_steps):
        if ddp:
            # all-reduce the gradients only on the last micro-step; the others just accumulate locally
            model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        with ctx:
            _, loss = model(x, y)
            loss = loss / gradient_accumulation_steps  # the gradients sum over micro-steps
        loss_sum += loss.detach()
        if micro_step + 1 < gradient_accumulation_steps:
            # draw the next batch while the GPU works on this one
            x, y = get_batch("train", seed, 0, iter_num, first_micro + micro_step + 1)
        scaler.scale(loss).backward()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)

    # timing and logging
    t1 = time.time()
    dt = t1 - t0
    t0 = t1
    if iter_num % log_interval == 0 and master_process:
        lossf = loss_sum.item()  # a CPU-GPU sync, so only at log points
        if not math.isfinite(lossf):
            stop_diverged(f"the training loss is {lossf} at iter {iter_num}")
        if local_iter_num >= 5:  # let the first iterations (compilation, allocation) pass
            mfu = raw_model.estimate_mfu(batch_size * gradient_accumulation_steps * ddp_world_size, dt, peak_flops)
            if mfu is not None:
                running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
            running_dt = dt if running_dt is None else 0.9 * running_dt + 0.1 * dt
        tokens_per_s = tokens_per_iter / dt
        mfu_text = f"{running_mfu * 100:.2f}%" if running_mfu >= 0 else "n/a"
        eta = format_eta((max_iters - iter_num) * (running_dt or dt))
        print(
            f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, mfu {mfu_text}, "
            f"tok/s {tokens_per_s:,.0f}, eta {eta}"
        )
        record = {"iter": iter_num, "loss": lossf, "lr": lr, "ms": dt * 1000, "tokens_per_s": tokens_per_s}
        log_metrics({**record, "mfu": running_mfu if running_mfu >= 0 else None})
        if wandb_log:
            wandb.log({"iter": iter_num, "train/loss_step": lossf, "tokens_per_s": tokens_per_s})
    iter_num += 1
    local_iter_num += 1

    if iter_num > max_iters:
        break

if ddp:
    destroy_process_group()
