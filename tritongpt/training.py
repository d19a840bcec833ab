"""The training core train.py runs, as functions that take their inputs as arguments: the learning-rate
schedule, the data stream, one optimizer step, evaluation, processes and devices, early stopping and
stopping on a signal. bench/train.py times the very same step function.
"""
import gc
import math
import os
import signal
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # torch 2.5 has FSDP2 under its first name
    from torch.distributed._composable.fsdp import FSDPModule

from tritongpt.data import TokenSplit
from tritongpt.optim import parameter_kind

Batch = tuple[torch.Tensor, torch.Tensor]


# -----------------------------------------------------------------------------
# Learning rate


def get_lr(it: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int, min_lr: float,
           decay_lr: bool = True) -> float:
    """nanoGPT's schedule: linear warmup from learning_rate / (warmup_iters + 1) at step 0 to learning_rate,
    then cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


# -----------------------------------------------------------------------------
# Data: which batch each micro-step sees


def batch_seed(*parts: int) -> int:
    """A seed for one batch, a pure function of (seed, stream, step, index), with stream 0 for training and
    1, 2 for the eval splits: the data stream is the same whatever the number of processes, and a resumed
    run draws exactly the batches it would have drawn."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class Batches:
    """Draws the batches of a run: split, then (seed, stream, step, index) names the batch."""

    splits: dict[str, TokenSplit]
    batch_size: int
    block_size: int
    device: torch.device
    seed: int

    def get(self, split: str, *seed_parts: int) -> Batch:
        generator = torch.Generator().manual_seed(batch_seed(self.seed, *seed_parts))
        x, y = self.splits[split].get_batch(self.batch_size, self.block_size, generator)
        if self.device.type == "cuda":
            # pinned memory lets the copy to the GPU run asynchronously (non_blocking)
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def train(self, iter_num: int, micro_step: int) -> Batch:
        """The micro_step-th batch of a training step, counted over all processes."""
        return self.get("train", 0, iter_num, micro_step)

    def eval(self, split: str, k: int) -> Batch:
        """The k-th eval batch of a split: the same at every eval, so evals compare."""
        return self.get(split, 1 + ("train", "val").index(split), k)


# -----------------------------------------------------------------------------
# One optimizer step


def gradient_sync_switch(model: torch.nn.Module, raw_model: torch.nn.Module) -> Callable[[bool], None] | None:
    """How to turn gradient reduction on and off across micro-steps: DDP and FSDP reduce the gradients on
    the last micro-step only; the others just accumulate locally. None for one process."""
    if isinstance(raw_model, FSDPModule):
        return raw_model.set_requires_gradient_sync
    if isinstance(model, DDP):
        def switch(sync: bool) -> None:
            model.require_backward_grad_sync = sync
        return switch
    return None


def clip_grad_norm(parameters: list[torch.Tensor], max_norm: float, counted: list[torch.Tensor] | None = None,
                   group=None) -> torch.Tensor:
    """torch's clip_grad_norm_, also for a model split across processes. `counted`: the parameters whose
    gradients make up the norm (default all; a pipeline stage leaves out its copy of a tied matrix);
    `group`: the processes holding the rest of the model (pipeline stages), whose squared norms add up.
    Tensor parallelism makes some parameters DTensors, which torch's one foreach call cannot mix with plain
    tensors (or DTensors of another mesh): each kind gets its own norm, whole across its ranks."""
    parameters = [p for p in parameters if p.grad is not None]
    kinds: dict[tuple, list[torch.Tensor]] = {}
    for param in parameters:
        kinds.setdefault(parameter_kind(param), []).append(param)
    if len(kinds) <= 1 and counted is None and group is None:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    counted_ids = {id(p) for p in (parameters if counted is None else counted)}
    square = torch.zeros((), device=parameters[0].device if parameters else None)
    for params in kinds.values():
        grads = [p.grad for p in params if id(p) in counted_ids]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            square = square + (norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2
    if group is not None:
        torch.distributed.all_reduce(square, group=group)
    total = square.sqrt()
    for params in kinds.values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def apply_update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, parameters: list[torch.Tensor],
                 grad_clip: float, counted: list[torch.Tensor] | None = None, group=None) -> None:
    """After the backward: clip (see clip_grad_norm), step, and clear the gradients."""
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        clip_grad_norm(parameters, grad_clip, counted, group)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               get_batch: Callable[[int], Batch], accumulation_steps: int, grad_clip: float, autocast,
               sync_gradients: Callable[[bool], None] | None = None) -> torch.Tensor:
    """Forward and backward over `accumulation_steps` micro-batches (get_batch(i) gives the i-th), then
    clip and step. Returns the mean loss over the micro-batches, detached, on the device (reading it is
    a CPU-GPU sync, left to the caller)."""
    losses = []  # detached: summed once at the end, one launch however many micro-steps
    x, y = get_batch(0)
    for micro_step in range(accumulation_steps):
        last = micro_step == accumulation_steps - 1
        if sync_gradients is not None:
            sync_gradients(last)
        with autocast:
            _, loss = model(x, y)
            loss = loss / accumulation_steps  # the gradients sum over micro-steps
        losses.append(loss.detach())
        if not last:
            x, y = get_batch(micro_step + 1)  # draw the next batch while the GPU works on this one
        scaler.scale(loss).backward()
    apply_update(optimizer, scaler, list(model.parameters()), grad_clip)
    return losses[0] if len(losses) == 1 else torch.stack(losses).sum()


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, get_batch: Callable[[str, int], Batch], eval_iters: int, autocast,
                  rank: int = 0, world_size: int = 1, group=None,
                  splits: Iterable[str] = ("train", "val")) -> dict[str, float]:
    """Mean loss over eval_iters batches of each split (get_batch(split, k) gives the k-th). Each of the
    world_size data ranks (in process group `group`, default all) evaluates its share; gathering every
    batch's loss, rather than summing partial means, makes the result the very number one process
    computes. The ranks of a tensor-parallel group compute the same losses together."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {}
    per_rank = math.ceil(eval_iters / world_size)
    for split in splits:
        losses = torch.zeros(per_rank * world_size, device=device)
        # the last rank may run past eval_iters: FSDP needs every rank in every forward; the extra is dropped
        for k in range(rank * per_rank, (rank + 1) * per_rank):
            x, y = get_batch(split, k)
            with autocast:
                _, loss = model(x, y)
            losses[k] = loss
        if world_size > 1:
            # each slot is nonzero on one rank only: the sum is exact
            torch.distributed.all_reduce(losses, group=group)
        out[split] = losses[:eval_iters].mean().item()
    model.train(was_training)
    return out


class EarlyStopping:
    """Stop when the val loss has not improved for `patience` consecutive evals (0: never)."""

    def __init__(self, patience: int, best: float = float("inf"), evals_since_best: int = 0):
        if patience < 0:
            raise ValueError(f"early_stopping_patience must be >= 0 (0 turns it off), got {patience}")
        self.patience = patience
        self.best = best
        self.evals_since_best = evals_since_best

    def update(self, val_loss: float) -> bool:
        """Record an eval; True when it is a new best."""
        improved = val_loss < self.best
        if improved:
            self.best = val_loss
            self.evals_since_best = 0
        else:
            self.evals_since_best += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.evals_since_best >= self.patience


# -----------------------------------------------------------------------------
# Processes and devices


@dataclass
class Distributed:
    """This process's place in the run: rank 0 of 1 without torchrun."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    restart_count: int = 0  # torchrun's restarts of the workers after a failure

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or torch.distributed.is_initialized()

    @property
    def master(self) -> bool:
        return self.rank == 0  # prints, logs and writes the checkpoint files


def setup_distributed(device: str, backend: str, env: dict | None = None) -> Distributed:
    """Join the process group when run under torchrun (RANK is set), each process on its own GPU."""
    env = os.environ if env is None else env
    restart_count = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if "RANK" not in env:
        return Distributed(device=torch.device(device), restart_count=restart_count)
    rank, local_rank, world_size = int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend=backend if device.startswith("cuda") else "gloo")
    # torchrun counts restarts per node, and one whose workers were restarted because another node's failed
    # may count none: restarted anywhere is restarted everywhere
    restarts = torch.tensor(restart_count, device=device)
    torch.distributed.all_reduce(restarts, op=torch.distributed.ReduceOp.MAX)
    return Distributed(rank, local_rank, world_size, torch.device(device), int(restarts))


def teardown_distributed(dist: Distributed) -> None:
    """Leave the process group. Free the models and optimizers (FSDP's state) before calling this:
    gloo work objects they hold can abort the process if destroyed during interpreter shutdown
    (seen on CPU with torch 2.13, one exit in ~15)."""
    if torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()


def per_rank_accumulation(gradient_accumulation_steps: int, world_size: int) -> int:
    """Each process runs its share of the micro-batches, so the global batch stays the same."""
    if gradient_accumulation_steps % world_size != 0:
        raise ValueError(
            f"gradient_accumulation_steps={gradient_accumulation_steps} is not divisible by the {world_size} "
            f"processes; pick a multiple of {world_size} so the global batch stays the same"
        )
    return gradient_accumulation_steps // world_size


# -----------------------------------------------------------------------------
# Stopping on a signal


class StopSignal:
    """SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C) asks the run to stop after the current step,
    saving a checkpoint first; a second Ctrl-C aborts at once."""

    EXIT_CODES = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}

    def __init__(self):
        self.received: int | None = None
        self.previous = {}

    def install(self) -> "StopSignal":
        for signum in self.EXIT_CODES:
            self.previous[signum] = signal.signal(signum, self.handle)
        self.previous_excepthook = sys.excepthook
        sys.excepthook = self.excepthook
        return self

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
        sys.excepthook = self.previous_excepthook

    def handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            # the second Ctrl-C: no more waiting. An exception, not an exit, so that a file being written
            # is deleted on the way out (atomic_open) and the last whole checkpoint stays.
            raise KeyboardInterrupt
        self.received = signum
        name = signal.Signals(signum).name
        print(f"\n{name} received: stopping after this step and saving a checkpoint "
              "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def excepthook(self, kind, value, traceback) -> None:
        if kind is KeyboardInterrupt and self.received is not None:
            print("aborted by a second Ctrl-C: nothing more was saved; the last checkpoint is whole",
                  file=sys.stderr)
            return
        self.previous_excepthook(kind, value, traceback)

    @property
    def exit_code(self) -> int:
        return self.EXIT_CODES.get(self.received, 1)


def agree_to_stop(stop: bool, device: torch.device, world_size: int) -> bool:
    """True on every rank when any rank wants to stop, so all stop after the same step (the save is
    collective)."""
    if world_size == 1:
        return stop
    flag = torch.tensor(int(stop), device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())
