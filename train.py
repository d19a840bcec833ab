"""
Train a GPT: on one CPU or GPU,

$ python train.py config/shakespeare.py --batch_size=32

or with DDP on several GPUs of one node (or several CPU processes, with gloo),

$ torchrun --standalone --nproc_per_node=8 train.py config/shakespeare.py

or with FSDP2, which shards the parameters, gradients and optimizer state across the GPUs, for models whose
training state does not fit on one (e.g. finetuning gpt2-xl),

$ torchrun --standalone --nproc_per_node=8 train.py config/finetune_shakespeare.py --parallel=fsdp

and across nodes (the same command on each; the rendezvous endpoint is a host:port of the first node):

$ torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=10.0.0.1:29500 --rdzv-id=run1 train.py

FSDP checkpoints are sharded (out_dir/ckpt_dcp/); this writes the latest as one out_dir/ckpt.pt in nanoGPT's
format, for sample.py or for resuming without FSDP:

$ python train.py --out_dir=out --consolidate=True

Under `torchrun --max-restarts=N`, restarted workers resume from the latest checkpoint by themselves.
docs/scaling.md has the details. The config keys, defaults, command lines, data files and checkpoints are nanoGPT's.
"""
import gc
import json
import math
import os
import shutil
import time
import warnings

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed import destroy_process_group, init_process_group
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # torch 2.5 has FSDP2 under its first name
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

from configurator import autocast, configure, resolve_compile, resolve_device, resolve_dtype
from data import TokenSplit, atomic_open, load_meta
from model import GPT, GPTConfig, gelu_approximate, gpu_peak_flops, model_from_checkpoint, set_gelu_approximate

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
consolidate = False  # if True, write out_dir/ckpt.pt from the sharded out_dir/ckpt_dcp of an fsdp run, and exit
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
parallel = "ddp"  # under torchrun: 'ddp' (a model replica per process) or 'fsdp' (the model sharded across them)
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
    """Mean loss over eval_iters batches of each split; the same batches at every eval, so evals compare.
    Each rank evaluates its share of the batches; gathering every batch's loss, rather than summing partial
    means, makes the result the very number one process computes."""
    model.eval()
    out = {}
    per_rank = math.ceil(eval_iters / ddp_world_size)
    for split_index, split in enumerate(("train", "val")):
        losses = torch.zeros(per_rank * ddp_world_size, device=device)
        # the last rank may run past eval_iters: FSDP needs every rank in every forward; the extra is dropped
        for k in range(ddp_rank * per_rank, (ddp_rank + 1) * per_rank):
            x, y = get_batch(split, seed, 1 + split_index, k)
            with ctx:
                _, loss = model(x, y)
            losses[k] = loss
        if ddp:
            torch.distributed.all_reduce(losses)  # each slot is nonzero on one rank only: the sum is exact
        out[split] = losses[:eval_iters].mean().item()
    model.train()
    return out


def stop_diverged(what: str) -> None:
    raise SystemExit(
        f"error: {what}: training diverged. Nothing more is saved, so {dcp_dir if fsdp else ckpt_path} keeps the last "
        "good weights; lower learning_rate, raise warmup_iters or set grad_clip, then continue with --init_from=resume."
    )


def log_metrics(record: dict) -> None:
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def format_eta(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def shard_model(model: GPT) -> None:
    """FSDP2: shard each block's parameters (so its gradients and optimizer state too) across the ranks,
    then the rest at the root; a block's are all-gathered only while it computes. Under bf16/fp16 they are
    gathered in that dtype and the gradients reduced in fp32."""
    mesh = init_device_mesh(device_type, (ddp_world_size,))
    policy = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


# -----------------------------------------------------------------------------
# checkpoints: out_dir/ckpt.pt, one file (one process, DDP), or out_dir/ckpt_dcp/, one file per rank (FSDP)
ckpt_path = os.path.join(out_dir, "ckpt.pt")
dcp_dir = os.path.join(out_dir, "ckpt_dcp")
TRAIN_STATE = "train_state.pt"  # in ckpt_dcp/: what ckpt.pt holds besides the model and optimizer


def sharded_checkpoint() -> str | None:
    """ckpt_dcp, or the previous one where a save died between its two renames."""
    return next((path for path in (dcp_dir, dcp_dir + ".old") if os.path.isdir(path)), None)


def load_sharded(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint into a model and its optimizer, sharded or not: DCP reads whatever part
    of each tensor they hold, whatever the number of processes that saved it."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def save_sharded(train_state: dict) -> None:
    """Every rank writes its shards into ckpt_dcp.tmp; then rank 0 swaps it in for ckpt_dcp, so the old
    checkpoint stays whole until the new one is (out_dir must be shared by the nodes)."""
    tmp, old = dcp_dir + ".tmp", dcp_dir + ".old"
    if master_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    torch.distributed.barrier()
    model_state, optim_state = get_state_dict(raw_model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    if master_process:
        torch.save(train_state, os.path.join(tmp, TRAIN_STATE))
        # a directory cannot be renamed over another, hence two renames
        if os.path.isdir(dcp_dir):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dcp_dir, old)
        os.replace(tmp, dcp_dir)
        shutil.rmtree(old, ignore_errors=True)


def consolidate_checkpoint() -> None:
    """ckpt_dcp -> ckpt.pt: load the shards into one plain model and optimizer on the CPU and save them
    in nanoGPT's format, which sample.py, nanoGPT and a DDP or one-process resume read."""
    path = sharded_checkpoint()
    if path is None:
        raise SystemExit(f"error: --consolidate=True reads the sharded checkpoint of an fsdp run, {dcp_dir}: not found")
    state = torch.load(os.path.join(path, TRAIN_STATE), map_location="cpu", weights_only=False)
    model = GPT(GPTConfig(**state["model_args"]))
    # the hyperparameters are placeholders: the checkpoint's param_groups replace them
    optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), "cpu")
    with warnings.catch_warnings():  # DCP warns that it loads in a single process: the very point here
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        load_sharded(path, model, optimizer)
    with atomic_open(ckpt_path) as f:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **state}, f)
    print(f"wrote {ckpt_path} from {path} (iter {state['iter_num']})")


def read_checkpoint() -> tuple[str, dict]:
    """Where to resume from, and the training state there: all of ckpt.pt, or for fsdp ckpt_dcp's
    train_state.pt (its shards load once the model is sharded)."""
    if fsdp:
        path = sharded_checkpoint()
    else:
        path = ckpt_path if os.path.exists(ckpt_path) else None
    if path is None:
        hint = "train with init_from='scratch' first"
        if fsdp and os.path.exists(ckpt_path):
            hint = f"{ckpt_path} cannot be loaded sharded: resume it with --parallel=ddp"
        elif not fsdp and sharded_checkpoint():
            hint = f"resume {dcp_dir} with --parallel=fsdp, or make a ckpt.pt of it with --consolidate=True"
        raise SystemExit(f"error: init_from='resume' but {dcp_dir if fsdp else ckpt_path} does not exist; {hint}")
    return path, torch.load(os.path.join(path, TRAIN_STATE) if fsdp else path, map_location="cpu", weights_only=False)


if consolidate:
    consolidate_checkpoint()
    raise SystemExit


# -----------------------------------------------------------------------------
# processes and devices
ddp = int(os.environ.get("RANK", -1)) != -1  # is this a torchrun run?
if parallel not in ("ddp", "fsdp"):
    raise SystemExit(f"error: parallel must be 'ddp' or 'fsdp', got {parallel!r}")
if parallel == "fsdp" and not ddp:
    raise SystemExit(
        "error: --parallel=fsdp shards the model across processes; run under torchrun, e.g. "
        "torchrun --standalone --nproc_per_node=8 train.py ... --parallel=fsdp"
    )
fsdp = parallel == "fsdp"
restart_count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))  # torchrun's restarts after failures
device = resolve_device(device)
if ddp:
    ddp_rank = int(os.environ["RANK"])
    ddp_local_rank = int(os.environ["LOCAL_RANK"])
    ddp_world_size = int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{ddp_local_rank}"
        torch.cuda.set_device(device)
    init_process_group(backend=backend if device.startswith("cuda") else "gloo")
    # torchrun counts restarts per node, and one whose workers were restarted because another node's failed
    # may count none: restarted anywhere is restarted everywhere
    restarts = torch.tensor(restart_count, device=device)
    torch.distributed.all_reduce(restarts, op=torch.distributed.ReduceOp.MAX)
    restart_count = int(restarts)
    master_process = ddp_rank == 0  # prints, logs and writes ckpt.pt
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
if restart_count > 0 and (sharded_checkpoint() if fsdp else os.path.exists(ckpt_path)):
    init_from = "resume"  # torchrun restarted the workers after a failure: carry on from the last checkpoint
torch.manual_seed(seed)  # the same initial weights on every rank: FSDP shards them where they are
if init_from == "scratch":
    model_args["vocab_size"] = meta_vocab_size if meta_vocab_size is not None else 50304
    model = GPT(GPTConfig(**model_args), attn_impl, ln_impl)
elif init_from == "resume":
    resume_path, checkpoint = read_checkpoint()
    # the architecture comes from the checkpoint; dropout may be changed on resume
    for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size"):
        model_args[k] = checkpoint["model_args"][k]
    if fsdp:
        model = GPT(GPTConfig(**model_args), attn_impl, ln_impl)  # its weights load once sharded
        set_gelu_approximate(model, checkpoint["gelu_approximate"])
    else:
        model = model_from_checkpoint({**checkpoint, "model_args": model_args}, attn_impl, ln_impl)
    iter_num = checkpoint["iter_num"]
    best_val_loss = checkpoint["best_val_loss"]
    if master_process:
        # after an elastic restart, the iterations since the checkpoint run (and are logged) again
        print(f"resuming from {resume_path} at iter {iter_num}" + (f", restart {restart_count}" if restart_count else ""))
        log_metrics({"iter": iter_num, "event": "resume", "restart": restart_count})
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
if ddp:
    torch.manual_seed(seed + ddp_rank)  # dropout differs per rank

splits = {split: TokenSplit(data_dir, split, dataset, model_args["vocab_size"]) for split in ("train", "val")}

if fsdp:
    shard_model(model)
# fp16 needs loss scaling to keep small gradients from underflowing; elsewhere the scaler is a no-op
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if checkpoint is not None:
    if fsdp:
        load_sharded(resume_path, model, optimizer)
    else:
        optimizer.load_state_dict(checkpoint["optimizer"])
    if "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])
    rng = checkpoint.get("rng")
    if rng is not None and rng["world_size"] == ddp_world_size:
        torch.set_rng_state(rng["torch"][ddp_rank])
        if device_type == "cuda" and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"][ddp_rank], device)
checkpoint = None  # free the memory

raw_model = model  # without the compile and DDP wrappers: what gets saved, and what estimate_mfu is asked
if compile:
    if master_process:
        print("compiling the model... (takes a ~minute)")
    model = torch.compile(model)
if ddp and not fsdp:
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == "cuda" else None)

if wandb_log and master_process:
    import wandb

    wandb.init(project=wandb_project, name=wandb_run_name, config=config)


def save_checkpoint() -> None:
    """Every rank takes part: the RNG states are gathered from all, and under FSDP each writes its shards."""
    state = {"model_args": model_args, "iter_num": iter_num, "best_val_loss": best_val_loss, "config": config,
             "scaler": scaler.state_dict(), "rng": gather_rng_states(), "gelu_approximate": gelu_approximate(raw_model)}
    if fsdp:
        save_sharded(state)
    elif master_process:
        # a temp file renamed over the old one: a run killed at any moment leaves either the
        # old checkpoint or the new one, never a torn file
        with atomic_open(ckpt_path) as f:
            torch.save({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), **state}, f)


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
        losses = estimate_loss()  # on every rank, so each knows whether to save
        if master_process:
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            if eval_only:
                print(f"val perplexity {math.exp(losses['val']):.2f}")
            log_metrics({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"], "lr": lr})
            if wandb_log:
                wandb.log({"iter": iter_num, "train/loss": losses["train"], "val/loss": losses["val"], "lr": lr})
        if not (math.isfinite(losses["train"]) and math.isfinite(losses["val"])):
            stop_diverged(f"the eval loss is {losses['val']} at step {iter_num}")
        improved = losses["val"] < best_val_loss
        best_val_loss = min(best_val_loss, losses["val"])
        # nothing is saved before the first step
        if (improved or always_save_checkpoint) and iter_num > 0 and not eval_only:
            if master_process:
                print(f"saving checkpoint to {dcp_dir if fsdp else out_dir}")
            save_checkpoint()
    if eval_only:
        break
    if iter_num == int(os.environ.get("TRITONGPT_TEST_CRASH_AT_ITER", "-1")) and ddp_rank == 1 and restart_count == 0:
        os._exit(1)  # test-only: a worker dying, for tests/test_distributed.py's elastic restart test

    # forward backward update, with gradient accumulation to simulate a larger batch
    loss_sum = torch.zeros((), device=device)
    first_micro = ddp_rank * gradient_accumulation_steps
    x, y = get_batch("train", seed, 0, iter_num, first_micro)
    for micro_step in range(gradient_accumulation_steps):
        # reduce the gradients only on the last micro-step; the others just accumulate locally
        if fsdp:
            raw_model.set_requires_gradient_sync(micro_step == gradient_accumulation_steps - 1)
        elif ddp:
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

if fsdp and master_process:
    print(f"for sample.py, make a ckpt.pt of {dcp_dir}: python train.py --out_dir={out_dir} --consolidate=True")
if ddp:
    # free FSDP's state while Python still runs: gloo work objects it holds can abort the process if
    # destroyed during interpreter shutdown (seen on CPU with torch 2.13, one exit in ~15)
    del model, raw_model, optimizer
    gc.collect()
    destroy_process_group()
