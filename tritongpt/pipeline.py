"""Pipeline parallelism with torch.distributed.pipelining: the layers split into stages, one (or, for the
interleaved schedule, several) per rank of a pipeline, and micro-batches flowing through them.

Each rank keeps a GPT pruned to its stages: its blocks (under their own layer numbers, so parameter names,
checkpoints and the optimizer state stay those of the whole model), the embeddings on the first stage,
the final norm and lm_head on the last. A `Stage` module runs one stage's part of GPT.forward; torch's
PipelineStage and schedules move the activations between ranks. The micro-batches of a step are the
gradient-accumulation micro-batches, so a pipeline sees the very batches one process does.

Tied embeddings: the first stage embeds with the matrix the last stage unembeds with. Each holds a copy
(the last one under both names, transformer.wte and lm_head, as one tensor), their gradients are summed
between the two ranks after the backward, and the same AdamW update keeps the copies equal.
"""
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleLoopedBFS,
)
from torch.distributed.tensor import DTensor

from model import GPT, GPTConfig, cross_entropy
from tritongpt.parallelism import Layout, LayoutError
from tritongpt.data import Batch

from tritongpt.loop import apply_update

SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe, "interleaved_1f1b": ScheduleInterleaved1F1B}


def stages_per_rank(schedule: str, interleaved_stages: int) -> int:
    return interleaved_stages if schedule == "interleaved_1f1b" else 1


def check_pipeline(config: GPTConfig, layout: Layout, schedule: str, interleaved_stages: int, microbatches: int,
                   dtype: str) -> None:
    """Errors before any work starts: schedules that do not exist or cannot run this many micro-batches,
    stages without layers, and what a pipeline cannot do."""
    if schedule not in SCHEDULES:
        raise LayoutError(f"pipeline_schedule must be one of {tuple(SCHEDULES)}, got {schedule!r}")
    if layout.pipeline == 1:
        return
    if config.doc_token >= 0 or config.attn_window:
        raise LayoutError("doc_token and attn_window mask attention by the tokens, which the later pipeline stages "
                          "never see: train them with data or tensor parallelism (pipeline_parallel=1)")
    if schedule == "interleaved_1f1b" and interleaved_stages < 2:
        raise LayoutError(f"pipeline_schedule='interleaved_1f1b' runs several stages per rank: "
                          f"pipeline_stages_per_rank must be >= 2, got {interleaved_stages}")
    n_stages = layout.pipeline * stages_per_rank(schedule, interleaved_stages)
    if config.n_layer < n_stages:
        raise LayoutError(f"{n_stages} pipeline stages need at least one layer each, and the model has "
                          f"n_layer={config.n_layer}: lower pipeline_parallel (or pipeline_stages_per_rank)")
    if schedule != "gpipe" and microbatches < layout.pipeline:
        raise LayoutError(
            f"pipeline_schedule={schedule!r} needs at least as many micro-batches per step as pipeline ranks "
            f"({layout.pipeline}), and each data rank runs {microbatches} (gradient_accumulation_steps / data "
            "parallel degree): raise gradient_accumulation_steps, or use pipeline_schedule='gpipe'")
    if schedule == "interleaved_1f1b":
        rounds = max(1, microbatches // layout.pipeline)
        if microbatches % rounds:
            raise LayoutError(f"pipeline_schedule='interleaved_1f1b' needs the {microbatches} micro-batches per data "
                              f"rank to be a multiple of {rounds}: make it a multiple of pipeline_parallel")
    if dtype == "float16":
        raise LayoutError("dtype='float16' needs loss scaling, whose skip-a-step decisions would differ between "
                          "pipeline stages; use dtype='bfloat16' or pipeline_parallel=1")


def bubble_fraction(pipeline_parallel: int, microbatches: int, stages_on_each_rank: int = 1) -> float:
    """The share of a step each rank waits, idle, for the pipeline to fill and drain: (p - 1) / (v m + p - 1)
    for p ranks, m micro-batches and v stages per rank (GPipe and 1F1B have the same bubble, 1F1B holds
    fewer activations; interleaving divides the bubble by v)."""
    p, m, v = pipeline_parallel, microbatches, stages_on_each_rank
    return (p - 1) / (v * m + p - 1)


def stage_layers(n_layer: int, n_stages: int) -> list[range]:
    """Layers per stage, as even as can be: stage s holds layers [s L / S, (s + 1) L / S)."""
    bounds = [round(s * n_layer / n_stages) for s in range(n_stages + 1)]
    return [range(bounds[s], bounds[s + 1]) for s in range(n_stages)]


class Stage(nn.Module):
    """One stage: a few blocks, plus the embeddings on the first stage and the final norm and lm_head on
    the last. Registers only the modules it runs, so that FSDP wraps exactly those; the pruned GPT (whose
    methods embed and head) is kept outside the module tree."""

    def __init__(self, model: GPT, layers: range, index: int, n_stages: int):
        super().__init__()
        self.__dict__["gpt"] = model  # not a submodule: it holds the other stages of this rank too
        self.index, self.n_stages = index, n_stages
        self.first, self.last = index == 0, index == n_stages - 1
        self.blocks = nn.ModuleList(model.transformer.h[str(i)] for i in layers)
        self.ends = nn.ModuleDict()
        if self.first:
            self.ends.update({name: model.transformer[name] for name in ("wte", "wpe") if name in model.transformer})
        if self.last:
            self.ends.update({"ln_f": model.transformer.ln_f, "lm_head": model.lm_head})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (first stage) or the residual stream in; the residual stream or (last stage) logits out."""
        if self.first:
            x = self.gpt.embed(x)
        rope = self.gpt.rotary(x.size(1), 0, x.device)
        for block in self.blocks:
            x = block(x, rope)
        return self.gpt.head(x) if self.last else x


def split_model(model: GPT, layout: Layout, schedule: str, interleaved_stages: int) -> tuple[GPT, list[Stage]]:
    """Prune `model` (in place) to this rank's stages and return it with their Stage modules. Stage s of S
    sits on pipeline rank s mod p (the interleaved schedule's loop)."""
    per_rank = stages_per_rank(schedule, interleaved_stages)
    n_stages = layout.pipeline * per_rank
    mine = [layout.pipeline_rank + k * layout.pipeline for k in range(per_rank)]
    layers = stage_layers(model.config.n_layer, n_stages)
    first, last = 0 in mine, n_stages - 1 in mine
    kept = [i for s in mine for i in layers[s]]
    model.transformer.h = nn.ModuleDict({str(i): model.transformer.h[i] for i in kept})
    if not first:
        for name in ("wpe", "drop"):
            if name in model.transformer:
                del model.transformer[name]
        if not (last and model.config.tie_embeddings):  # the last stage keeps wte as its lm_head's other name
            del model.transformer["wte"]
    if not last:
        del model.transformer["ln_f"]
        model.lm_head = None
    stages = [Stage(model, layers[s], s, n_stages) for s in mine]
    return model, stages


def is_pipeline_part(model: nn.Module) -> bool:
    """A GPT pruned to some pipeline stages (its blocks are kept by layer number)."""
    return isinstance(model, GPT) and isinstance(model.transformer.h, nn.ModuleDict)


def retie(model: GPT) -> None:
    """Where a stage holds both names of the tied matrix, make them one tensor again (sharding replaces
    the lm_head's parameter)."""
    if model.config.tie_embeddings and model.lm_head is not None and "wte" in model.transformer:
        model.transformer.wte.weight = model.lm_head.weight


def own_state(state: dict, model: GPT) -> dict:
    """A whole model's {"model": ..., "optimizer": ...} state dicts (by parameter name) cut down to what a
    pipeline part holds, for set_state_dict."""
    names = set(model.state_dict())
    params = {name for name, _ in model.named_parameters()}
    cut = {"model": {k: v for k, v in state["model"].items() if k in names}}
    if "optimizer" in state:
        optim = state["optimizer"]
        groups = [{**group, "params": [p for p in group["params"] if p in params]} for group in optim["param_groups"]]
        cut["optimizer"] = {"state": {k: v for k, v in optim["state"].items() if k in params}, "param_groups": groups}
    return cut


class Pipeline(nn.Module):
    """The pipeline of this rank's stages, run by torch's schedules: `forward(idx, targets)` is an eval
    forward (returning the loss, on every rank, so train.py's estimate_loss works unchanged), and
    `forward_backward` one training step's forward and backward over all its micro-batches."""

    def __init__(self, model: GPT, stages: list[Stage], layout: Layout, mesh: DeviceMesh, schedule: str,
                 microbatches: int, device: torch.device):
        super().__init__()
        self.model = model
        self.group = mesh["pipeline"].get_group()
        self.last_rank = layout.pipeline - 1  # the pipeline rank holding the last stage

        def make_stages() -> list[PipelineStage]:
            return [PipelineStage(stage, stage.index, stage.n_stages, device, group=self.group) for stage in stages]

        train_stages, eval_stages = make_stages(), make_stages()
        loss_fn = cross_entropy  # a mean: the schedule divides the gradients by the number of micro-batches
        if len(stages) == 1:
            self.schedule = SCHEDULES[schedule](train_stages[0], n_microbatches=microbatches, loss_fn=loss_fn)
            self.eval_schedule = ScheduleGPipe(eval_stages[0], n_microbatches=1, loss_fn=loss_fn)
        else:
            self.schedule = SCHEDULES[schedule](train_stages, n_microbatches=microbatches, loss_fn=loss_fn)
            self.eval_schedule = ScheduleLoopedBFS(eval_stages, n_microbatches=1, loss_fn=loss_fn)
        self.first = any(stage.first for stage in stages)
        self.last = any(stage.last for stage in stages)
        self.tied_group = self._tied_group(mesh) if model.config.tie_embeddings else None

    @staticmethod
    def _tied_group(mesh: DeviceMesh):
        """The pairs of ranks (first stage, last stage) of each pipeline, which hold the tied matrix."""
        grid = mesh.mesh  # (data, pipeline, tensor)
        pairs = [[int(grid[d, 0, t]), int(grid[d, -1, t])] for d in range(grid.size(0)) for t in range(grid.size(2))]
        group, _ = dist.new_subgroups_by_enumeration(pairs)
        return group

    def _run(self, run, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Run a schedule's step or eval; the mean loss of the micro-batches, known on every pipeline rank."""
        losses = []
        if self.first:
            run(x, target=y, losses=losses)
        else:
            run(target=y, losses=losses)
        mean = torch.stack(losses).mean().detach() if self.last else torch.zeros((), device=y.device)
        dist.broadcast(mean, group_src=self.last_rank, group=self.group)
        return mean

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, self._run(self.eval_schedule.eval, idx, targets)

    def forward_backward(self, get_batch: Callable[[int], Batch], microbatches: int) -> torch.Tensor:
        """Forward and backward over the step's micro-batches (get_batch(i) gives the i-th; stacked here,
        the schedule splits them back), then the tied matrix's two gradients summed. Returns the mean loss."""
        micro = [get_batch(i) for i in range(microbatches)]
        x, y = torch.cat([b[0] for b in micro]), torch.cat([b[1] for b in micro])
        loss = self._run(self.schedule.step, x, y)
        if self.tied_group is not None:
            param = self.model.lm_head.weight if self.last else self.model.transformer.wte.weight
            if isinstance(param, DTensor) and param.grad.placements != param.placements:
                # a tensor-parallel embedding's gradient may come out replicated: the same slices on both sides
                param.grad = param.grad.redistribute(placements=param.placements)
            grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
            dist.all_reduce(grad, group=self.tied_group)
        return loss

    def norm_parameters(self) -> list[nn.Parameter]:
        """The parameters whose gradients count towards the pipeline's gradient norm: all of this rank's,
        except the last stage's copy of the tied matrix (the first stage counts it)."""
        params = list(self.model.parameters())
        if self.tied_group is not None and self.last and not self.first:
            params = [p for p in params if p is not self.model.lm_head.weight]
        return params


def describe(schedule: str, layout: Layout, microbatches: int, per_rank: int, n_layer: int) -> str:
    layers = stage_layers(n_layer, layout.pipeline * per_rank)
    sizes = ",".join(str(len(r)) for r in layers)
    bubble = bubble_fraction(layout.pipeline, microbatches, per_rank)
    return (f"pipeline: {layout.pipeline} ranks x {per_rank} stage(s), layers per stage {sizes}, schedule {schedule}, "
            f"{microbatches} micro-batches per step; bubble {bubble:.1%} of each step "
            f"((p-1)/(v*m+p-1) = {layout.pipeline - 1}/{per_rank * microbatches + layout.pipeline - 1})")



def train_step(pipe: Pipeline, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               get_batch: Callable[[int], Batch], microbatches: int, grad_clip: float, autocast) -> torch.Tensor:
    """loop.train_step for a pipeline: the schedule's forward and backward, then the same update, with
    the gradient norm taken over the whole pipeline. Returns the mean loss, on every rank."""
    with autocast:
        loss = pipe.forward_backward(get_batch, microbatches)
    apply_update(optimizer, scaler, list(pipe.model.parameters()), grad_clip, pipe.norm_parameters(), pipe.group)
    return loss
