"""
Train a GPT, with nanoGPT's config keys, command lines, data files and checkpoints: on one CPU or GPU,

$ python train.py config/shakespeare.py --batch_size=32

on several GPUs or nodes with DDP, FSDP2 (--parallel=fsdp), tensor and pipeline parallelism
(--tensor_parallel=2 --pipeline_parallel=2; data parallel over the rest),

$ torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py --parallel=fsdp

and `--consolidate=True` writes a sharded checkpoint (out_dir/ckpt_dcp/) as one nanoGPT ckpt.pt. SIGTERM or
Ctrl-C saves a checkpoint after the current step; `--init_from=resume` continues (and torchrun's restarted
workers do so by themselves). docs/scaling.md has the layouts, nodes and checkpoints. The parts are
functions in tritongpt/: run.py (the model at the start and in its layout), loop.py (the step, evaluation,
early stopping), optim.py, data.py, checkpoint.py, distributed.py and metrics.py.
"""
import functools
import math
import os
import sys
import time

import torch

from tritongpt import checkpoint as ckpt
from tritongpt import data, distributed, loop, metrics, optim, parallelism, run
from tritongpt.configurator import (UserError, autocast, configure, error_boundary, resolve_compile, resolve_device,
                                    resolve_dtype)
from tritongpt.data import load_meta
from tritongpt.fileio import remove_stale_temp_files, writable_directory
from tritongpt.impls import choose_impls

# -----------------------------------------------------------------------------
# default config values: GPT-2 (124M) on OpenWebText, as in nanoGPT
# I/O
out_dir = "out"
eval_interval = 2000
log_interval = 1
eval_iters = 200
eval_only = False  # if True, exit right after the first eval
always_save_checkpoint = True  # if True, ckpt.pt is the latest state; if False, the best (latest beside it)
early_stopping_patience = 0  # stop when the val loss has not improved for this many evals (0: never)
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
# the modern recipe, all off by default (GPT-2's architecture); README: "The modern recipe"
pos_embedding = "learned"  # 'learned' (GPT-2's position embedding) or 'rope' (rotary)
rope_base = 10000.0
norm = "layernorm"  # 'layernorm' or 'rmsnorm'
qk_norm = False  # RMS-normalize q and k of each head
activation = "gelu"  # 'gelu' or 'relu2' (ReLU squared)
tie_embeddings = True  # share the token embedding with the lm_head
logit_softcap = 0.0  # 0: off; c: logits = c * tanh(logits / c)
zero_init_proj = False  # zero-initialize the residual output projections
# packed documents (README: "Documents and windows"), off by default
doc_token = -1  # the token that starts each document (50256, <|endoftext|>, for GPT-2's BPE): attend within it
doc_positions = False  # with doc_token: positions restart at each document
attn_window = 0  # 0: off; w: each token attends to the last w tokens only, itself included
attn_impl = "auto"  # 'auto', 'eager', 'sdpa' or 'triton'
ln_impl = "auto"  # 'auto', 'torch' or 'triton'
ce_impl = "auto"  # the training loss: 'auto', 'torch' or 'triton' (fused linear cross-entropy, no logits held)
# adamw optimizer
learning_rate = 6e-4  # max learning rate
max_iters = 600000  # total number of training iterations
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip gradients at this value, or disable if == 0.0
optimizer = "adamw"  # 'adamw', or 'muon': Muon for the blocks' matrices, AdamW (the settings above) for the rest
muon_lr = 0.02  # Muon's peak learning rate (the schedule scales it like learning_rate)
muon_momentum = 0.95
# learning rate decay settings
decay_lr = True  # whether to decay the learning rate
warmup_iters = 2000  # how many steps to warm up for
lr_decay_iters = 600000  # should be ~= max_iters per Chinchilla
min_lr = 6e-5  # minimum learning rate, should be ~= learning_rate/10 per Chinchilla
# system
backend = "nccl"  # 'nccl', 'gloo', etc.; CPU runs always use gloo
parallel = "ddp"  # under torchrun: 'ddp' (a model replica per process) or 'fsdp' (the model sharded across them)
tensor_parallel = 1  # split each layer across this many processes (of one node); data parallel over the rest
pipeline_parallel = 1  # split the layers into this many pipeline stages, one per process
pipeline_schedule = "1f1b"  # '1f1b', 'gpipe' or 'interleaved_1f1b' (pipeline_stages_per_rank stages per process)
pipeline_stages_per_rank = 2  # for 'interleaved_1f1b' only
device = "auto"  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto', 'float32', 'bfloat16' or 'float16' (the latter with a GradScaler)
compile: bool | str = "auto"  # torch.compile the model; 'auto' compiles on CUDA only
seed = 1337
torch_threads = 0  # CPU threads for torch; 0 keeps torch's default
# -----------------------------------------------------------------------------
error_boundary()  # a failure ends with one line saying what to do, not a traceback (TRITONGPT_DEBUG=1 shows it)
given_keys: set[str] = set()  # the keys a config file or flag set: some cannot change on resume
config = configure(globals(), given=given_keys)
# -----------------------------------------------------------------------------

if consolidate:
    device_type = resolve_device(device).split(":")[0]
    # the optimizer the run saved (muon or adamw), not this command line's
    for path in ckpt.consolidate(out_dir, lambda model, saved: optim.optimizer_for(model, {**config, **saved},
                                                                                 device_type)):
        print(f"wrote {path}")
    raise SystemExit

# processes and devices
if parallel == "fsdp" and "RANK" not in os.environ:
    raise UserError("--parallel=fsdp shards the model across processes; run under torchrun, e.g. "
                    "torchrun --standalone --nproc_per_node=8 train.py ... --parallel=fsdp")
dist = distributed.setup_distributed(resolve_device(device), backend)
master_process = dist.master
layout = parallelism.plan_layout(dist.world_size, dist.rank, tensor_parallel, pipeline_parallel)
# the ranks of one model replica (tensor, pipeline) compute the same micro-batches: the batch splits over data
# ranks, and a pipeline's micro-batches are these
accumulation = distributed.per_rank_accumulation(gradient_accumulation_steps, layout.data)
device, device_type = dist.device, dist.device.type
dtype = resolve_dtype(dtype, str(device))
compile = resolve_compile(compile, str(device))
if torch_threads > 0:
    torch.set_num_threads(torch_threads)
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
if master_process:
    writable_directory(out_dir, "out_dir")
    for stale in remove_stale_temp_files(out_dir):
        print(f"removed {stale}, left by a run that died while writing it")
    print(f"device {device}, dtype {dtype}, compile {compile}, {dist.world_size} process(es)"
          + (f" ({layout.describe()})" if layout.model_parallel > 1 else ""))
    print(f"tokens per iteration will be: {tokens_per_iter:,}")
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
ctx = autocast(str(device), dtype)

# data
data_dir = data_dir or os.path.join("data", dataset)
meta = load_meta(data_dir)
meta_vocab_size = meta["vocab_size"] if meta else None
if meta_vocab_size is not None and master_process:
    print(f"found vocab_size = {meta_vocab_size} (inside {data_dir}'s meta file)")

# the model, in its layout
torch.manual_seed(seed)  # the same initial weights on every rank: FSDP shards them where they are
start = run.start_model(config, given_keys, meta_vocab_size, restarted=dist.restart_count > 0)
config, init_from, iter_num = start.config, start.init_from, start.iter_num
if start.checkpoint is not None and master_process:
    # after an elastic restart, the iterations since the checkpoint run (and are logged) again
    restarted = f", restart {dist.restart_count}" if dist.restart_count else ""
    print(f"resuming from {start.checkpoint.path} at iter {iter_num}{restarted}")
    metrics.log_metrics(out_dir, {"iter": iter_num, "event": "resume", "restart": dist.restart_count})
model = start.model
model.set_impl(attn_impl, ln_impl, run.check_layout(model, config, layout, accumulation, dtype, device_type))
flops_per_sequence = model.flops_per_token() * model.config.block_size  # the whole model's, for the MFU
model, stages = run.place(model, layout, config, device)
# dropout differs per data rank; the ranks of a tensor group hold the same activations, so draw the same masks
torch.manual_seed(seed + layout.data_rank)
splits = data.open_splits(data_dir, dataset, model.config.vocab_size, block_size)
batches = data.Batches(splits, batch_size, block_size, device, seed)
# the attention and norm implementations, chosen before compiling and sharding (under FSDP's engine the
# residual stream, so the norms' input, is in the mixed-precision dtype)
fsdp_engine = parallel == "fsdp" or (layout.model_parallel > 1 and layout.data > 1)
choose_impls(model, batch_size, device, getattr(torch, dtype), ln_dtype=getattr(torch, dtype) if fsdp_engine else None)
run_model = run.parallelize(model, stages, layout, config, dtype, compile, accumulation, device, dist.local_rank,
                            dist.enabled, print if master_process else lambda line: None)
raw_model = run_model.raw_model
# fp16 needs loss scaling to keep small gradients from underflowing; elsewhere the scaler is a no-op
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
make_optimizer = functools.partial(optim.optimizer_for, config=config, device_type=device_type,
                                   replica_group=run_model.replica_group)
opt = make_optimizer(raw_model)
run.load_checkpoint(start, raw_model, opt, make_optimizer, scaler, device, dist.rank, dist.world_size, layout)

run_log = metrics.RunLog(out_dir, tokens_per_iter, max_iters, master_process,
                         functools.partial(metrics.mfu_per_gpu, flops_per_sequence, batch_size * accumulation,
                                           peak_flops=metrics.gpu_peak_flops(device, dtype),
                                           model_parallel=layout.model_parallel),
                         dict(project=wandb_project, name=wandb_run_name, config=config) if wandb_log else None)


def save_checkpoint(latest: bool) -> None:
    """Every rank takes part: the RNG states are gathered from all, and under FSDP each writes its shards."""
    state = ckpt.train_state(raw_model, iter_num, early_stopping.best, config, scaler.state_dict(),
                             ckpt.gather_rng_states(device, dist.world_size, (layout.pipeline, layout.tensor)),
                             early_stopping.evals_since_best)
    path = ckpt.save(out_dir, latest, raw_model, opt, state, run_model.sharded, master_process)
    if master_process:
        if not latest:
            ckpt.remove_latest(out_dir)  # older than the one just written
        print(f"saved checkpoint {path} (iter {iter_num})")


def train_batch(micro_step: int) -> data.Batch:
    """This data rank's micro_step-th batch of the current iteration: its share of the global step's."""
    return batches.train(iter_num, layout.data_rank * accumulation + micro_step)


# -----------------------------------------------------------------------------
# training loop
early_stopping = loop.EarlyStopping(early_stopping_patience, start.best_val_loss, start.evals_since_best)
stop_signal = distributed.StopSignal().install()
stopped_by_signal = False
start_iter = iter_num
resumed_at = iter_num if init_from == "resume" else None
while True:
    final = iter_num >= max_iters
    if iter_num % eval_interval == 0 or final or eval_only:
        lr = optim.get_lr(iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr)
        losses = loop.estimate_loss(run_model.model, batches.eval, eval_iters, ctx, layout.data_rank, layout.data,
                                    run_model.data_group)
        run_log.eval(iter_num, losses, lr, perplexity=eval_only)
        if not (math.isfinite(losses["train"]) and math.isfinite(losses["val"])):
            raise loop.diverged(f"the eval loss is {losses['val']} at step {iter_num}", out_dir)
        # the eval a resumed run starts with repeats the checkpoint's: it neither counts nor saves again
        if iter_num != resumed_at:
            improved = early_stopping.update(losses["val"])
            if iter_num > 0 and not eval_only:  # nothing is saved before the first step
                # with always_save_checkpoint=False, ckpt.pt holds the best model: the latest goes beside it
                save_checkpoint(latest=not (always_save_checkpoint or improved))
        if early_stopping.should_stop:
            if master_process:
                print(f"early stopping at iter {iter_num}: the val loss has not improved on {early_stopping.best:.4f} "
                      f"for {early_stopping.evals_since_best} evals (early_stopping_patience={early_stopping_patience})")
            break
    if eval_only or final:
        break

    # forward, backward, update, with gradient accumulation to simulate a larger batch
    lr = optim.get_lr(iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr)
    optim.set_lr(opt, lr, learning_rate, muon_lr)
    t0 = time.time()
    loss = run_model.train_step(opt, scaler, train_batch, accumulation, grad_clip, ctx)

    # timing and logging
    if iter_num % log_interval == 0 and master_process:
        lossf = loss.item()  # a CPU-GPU sync, so only at log points
        if not math.isfinite(lossf):
            raise loop.diverged(f"the training loss is {lossf} at iter {iter_num}", out_dir)
        run_log.step(iter_num, lossf, lr, time.time() - t0)
    iter_num += 1

    # SIGTERM/SIGINT: every rank stops after the same step and saves what it has
    if distributed.agree_to_stop(stop_signal.received is not None, device, dist.world_size):
        save_checkpoint(latest=not always_save_checkpoint)
        stopped_by_signal = True
        break

stop_signal.uninstall()
if iter_num == start_iter and not eval_only and master_process:
    print(f"max_iters={max_iters} and the run starts at iter {start_iter}: no step was taken, so nothing was saved",
          file=sys.stderr)
if stopped_by_signal and master_process:
    print(f"stopped at iter {iter_num}; to continue, run the same command with --init_from=resume "
          f"(out_dir={out_dir})", file=sys.stderr)
model = raw_model = run_model = start = opt = stages = None  # free FSDP's state before leaving the process group
distributed.teardown_distributed(dist)
if stopped_by_signal:
    sys.exit(stop_signal.exit_code if stop_signal.received is not None else 143)
