"""What each iteration of train.py's loop runs, as functions that take their inputs as arguments: one
optimizer step over the micro-batches, evaluation, and early stopping. bench/train.py and bench/recipe.py
time the very same step function.
"""
import math
from collections.abc import Callable, Iterable

import torch
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # torch 2.5 has FSDP2 under its first name
    from torch.distributed._composable.fsdp import FSDPModule

from tritongpt.configurator import UserError
from tritongpt.data import Batch
from tritongpt.optim import parameter_kind

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


def diverged(what: str, out_dir: str) -> UserError:
    """The error that ends a run whose loss is no longer finite: nothing more is saved, so the checkpoints
    keep the last good weights."""
    return UserError(f"{what}: training diverged. Nothing more is saved, so the checkpoints in {out_dir} keep the "
                     "last good weights; lower learning_rate, raise warmup_iters or set grad_clip, then continue with "
                     "--init_from=resume (or, if this run started from that checkpoint, start again from an earlier "
                     "one or from scratch).")
