"""Optimizers: nanoGPT's AdamW, or Muon for the matrices inside the blocks with AdamW for the rest.

Muon (https://kellerjordan.github.io/posts/muon/) replaces each update of a weight matrix by the nearest
semi-orthogonal matrix of its momentum, computed with a few Newton-Schulz iterations. Embeddings, the
lm_head, norm gains and biases are not hidden-layer matrices and stay with AdamW. Both live in one
torch.optim.Optimizer (MuonWithAdamW), so the LR schedule, GradScaler, gradient clipping, checkpoints and
DCP see one optimizer with one state dict.

Weight decay: AdamW's (decoupled, lr * weight_decay per step) on the matrices it owns (embeddings and an
untied lm_head), none on gains and biases; Muon's, the same decoupled form with Muon's lr, on the block
matrices. The schedule (warmup, cosine decay) scales both learning rates by the same factor.
"""
from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

if TYPE_CHECKING:  # annotations only: model.py builds its optimizer with this module
    from model import GPT


# torch.optim.Muon's Newton-Schulz coefficients and steps (Keller Jordan's quintic iteration)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
OPTIMIZERS = ("adamw", "muon")


def adamw(groups: list[dict], learning_rate: float, betas: tuple[float, float], device_type: str) -> torch.optim.AdamW:
    """AdamW, fused where PyTorch has it (CUDA, and CPU since 2.4): the whole update in one launch. Under
    tensor parallelism some parameters are DTensors and some plain tensors (or DTensors on two meshes, with
    FSDP too), which one fused or foreach call cannot take: then AdamW steps one parameter at a time."""
    params = [p for group in groups for p in group["params"]]
    if len({parameter_kind(p) for p in params}) > 1:
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, foreach=False, fused=False)
    try:
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


def parameter_kind(param: torch.Tensor) -> tuple:
    """Which tensors one fused/foreach call can take together: plain ones, or DTensors of one mesh."""
    if isinstance(param, DTensor):
        return (param.device_mesh,)  # meshes compare and hash by their ranks and dimension names
    return ()


def newton_schulz(update: torch.Tensor, dtype: torch.dtype, eps: float = 1e-7) -> torch.Tensor:
    """torch.optim.Muon's orthogonalization, in `dtype`: torch's runs it in bfloat16 always, which a GPU
    multiplies fast and a CPU emulates slowly (several times slower than float32, see docs)."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def closure_loss(closure) -> torch.Tensor | None:
    """An optimizer step's closure, evaluated with gradients on (torch's convention), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Muon(torch.optim.Muon):
    """torch.optim.Muon's update rule, with the Newton-Schulz iterations in `ns_dtype` (bfloat16: torch's own
    step, to the bit; float32 for CPUs), and shared among processes when the matrices are (orthogonalize):
    DTensor parameters (FSDP2 shards, tensor-parallel slices) carry their mesh, and plain ones replicated by
    DDP name their group as `replica_group`."""

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, replica_group: dist.ProcessGroup | None = None,
                 **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype
        self.replica_group = replica_group

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            params = [param for param in group["params"] if param.grad is not None]
            updates = []
            for param in params:  # elementwise: each process on what it holds of each matrix
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(param.grad, 1 - momentum)
                updates.append(param.grad.lerp(buf, momentum) if group["nesterov"] else buf)
            orthogonal = orthogonalize(updates, self.ns_dtype, group["eps"], self.replica_group)
            for param, update in zip(params, orthogonal):
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-lr * lr_ratio(group["adjust_lr_fn"], param.shape))
        return loss


# -----------------------------------------------------------------------------
# Muon across processes: each matrix is gathered whole (DTensor's own redistribution), orthogonalized by one
# process that holds it (its owner, chosen to balance the work), and sent back to every holder in the
# parameter's own layout (a scatter for shards, a broadcast for replicas).


def spread_of(tensor: torch.Tensor, replica_group: dist.ProcessGroup | None) -> DeviceMesh | dist.ProcessGroup | None:
    """The processes a matrix is spread over: a DTensor's mesh, DDP's group for a plain replicated one, or
    None (this process alone holds it)."""
    if isinstance(tensor, DTensor):
        return tensor.device_mesh
    if replica_group is not None and dist.get_world_size(replica_group) > 1:
        return replica_group
    return None


def owner_slots(spread: DeviceMesh | dist.ProcessGroup) -> tuple[int, int | None]:
    """How many processes of a spread can own a matrix, and which of them this one is (None: it owns none).
    distribute_tensor sends from coordinate k on every mesh dimension, so on a mesh the owners are the
    processes at (k, k, ...); in a group, every process."""
    if isinstance(spread, DeviceMesh):
        coordinate = spread.get_coordinate()
        return min(spread.shape), coordinate[0] if len(set(coordinate)) == 1 else None
    return dist.get_world_size(spread), dist.get_rank(spread)


def newton_schulz_cost(shape: torch.Size) -> int:
    """Proportional to the iterations' multiply-adds: each multiplies the short side's Gram matrix."""
    short, long = sorted(shape[:2])
    return short * short * long


def assign_owners(costs: list[int], slots: int) -> list[int]:
    """Each matrix's owner, balancing the work: the costliest first, each to the least loaded so far (ties to
    the lowest slot, so every process computes the same assignment)."""
    loads, owners = [0] * slots, [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owners[index] = min(range(slots), key=lambda slot: (loads[slot], slot))
        loads[owners[index]] += costs[index]
    return owners


def orthogonalize(updates: list[torch.Tensor], ns_dtype: torch.dtype, eps: float,
                  replica_group: dist.ProcessGroup | None = None) -> list[torch.Tensor]:
    """newton_schulz of each update, laid out like the update. A matrix spread over processes is orthogonalized
    once, by its owner, in rounds of at most one matrix per owner: every process of the spread gathers the
    round's matrices, each owner orthogonalizes its own while the others do theirs, then each result goes
    back to every holder. A round holds one whole matrix per owner at a time, never the whole model."""
    results: list[torch.Tensor | None] = [None] * len(updates)
    by_spread: dict = {}
    for index, update in enumerate(updates):
        by_spread.setdefault(spread_of(update, replica_group), []).append(index)
    for spread, indices in by_spread.items():
        if spread is None:
            for index in indices:
                results[index] = newton_schulz(updates[index], ns_dtype, eps)
            continue
        slots, mine = owner_slots(spread)
        owners = assign_owners([newton_schulz_cost(updates[i].shape) for i in indices], slots)
        queues = [[i for i, owner in zip(indices, owners) if owner == slot] for slot in range(slots)]
        for round_ in itertools.zip_longest(*queues):
            chosen = [(index, slot) for slot, index in enumerate(round_) if index is not None]
            whole = {index: gather(updates[index]) for index, _ in chosen}
            # all of this round's work before any sending: an owner that sends first would keep the others
            # waiting for it, and then wait for theirs, one after the other
            mine_done = {index: newton_schulz(whole[index], ns_dtype, eps).contiguous()
                         for index, slot in chosen if slot == mine}
            for index, slot in chosen:
                result = mine_done.get(index, torch.empty_like(whole[index], dtype=ns_dtype))
                results[index] = send_from_owner(result, updates[index], spread, slot)
    return results


def gather(update: torch.Tensor) -> torch.Tensor:
    """The whole matrix on every process that holds part of it (a replica already is whole)."""
    return update.full_tensor() if isinstance(update, DTensor) else update


def send_from_owner(result: torch.Tensor, like: torch.Tensor, spread: DeviceMesh | dist.ProcessGroup,
                    slot: int) -> torch.Tensor:
    """The owner's `result` (garbage elsewhere) to every holder, laid out as `like`."""
    if isinstance(spread, DeviceMesh):
        return distribute_tensor(result, spread, like.placements, src_data_rank=slot)
    dist.broadcast(result, src=dist.get_global_rank(spread, slot), group=spread)
    return result


def lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's learning-rate adjustment for a matrix's shape."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))  # an update with AdamW's typical RMS: AdamW's lr works
    return math.sqrt(max(1, rows / cols))


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on the param groups marked muon=True, AdamW on the others, as one optimizer. The two share
    this optimizer's param groups and state (their parameters are disjoint), so state_dict(),
    load_state_dict(), GradScaler and DCP's state-dict helpers work on it as on any optimizer."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
        for group in adamw.param_groups:  # the flag is in the state dict, so a reload knows which is which
            group["muon"] = False
        super().__init__(muon.param_groups + adamw.param_groups, defaults={})  # the very same group dicts
        self.muon, self.adamw = muon, adamw
        self._link()

    def _link(self) -> None:
        """Point both optimizers at this one's groups and state (load_state_dict replaces them)."""
        self.muon.param_groups = [g for g in self.param_groups if g["muon"]]
        self.adamw.param_groups = [g for g in self.param_groups if not g["muon"]]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        self.muon.step()
        self.adamw.step()
        return loss


def optimizer_for(model: GPT, config: dict, device_type: str,
                  replica_group: dist.ProcessGroup | None = None) -> torch.optim.Optimizer:
    """build_optimizer with a run's config keys (train.py's: optimizer, learning_rate, weight_decay, beta1,
    beta2, muon_lr, muon_momentum)."""
    return build_optimizer(model, config["optimizer"], config["learning_rate"], config["weight_decay"],
                           (config["beta1"], config["beta2"]), device_type, config["muon_lr"], config["muon_momentum"],
                           replica_group)


def build_optimizer(model: GPT, optimizer: str, learning_rate: float, weight_decay: float,
                    betas: tuple[float, float], device_type: str, muon_lr: float = 0.02,
                    muon_momentum: float = 0.95, replica_group: dist.ProcessGroup | None = None) -> torch.optim.Optimizer:
    """The run's optimizer. 'adamw': nanoGPT's, with weight decay on the matrices (2D+) only. 'muon': Muon
    (lr muon_lr, Nesterov momentum muon_momentum) for the 2D weights inside the blocks, AdamW for the
    rest. `replica_group`: the processes over which DDP replicates the plain parameters, which then share
    Muon's work (sharded and tensor-parallel parameters are DTensors, which know their processes)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if optimizer == "adamw":
        groups = [{"params": [p for _, p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0}]
        return adamw(groups, learning_rate, betas, device_type)
    if not hasattr(torch.optim, "Muon"):
        raise ValueError(f"optimizer='muon' needs torch.optim.Muon (PyTorch >= 2.9); this is torch {torch.__version__}: "
                         "upgrade PyTorch or use optimizer='adamw'")
    names = set(block_matrices(model))
    in_blocks = [p for name, p in params if name in names]
    chosen = {id(p) for p in in_blocks}
    rest = [p for _, p in params if id(p) not in chosen]
    ns_dtype = torch.bfloat16 if device_type == "cuda" else torch.float32  # what the device multiplies fast
    muon = Muon([{"params": in_blocks, "muon": True}], ns_dtype=ns_dtype, replica_group=replica_group, lr=muon_lr,
                momentum=muon_momentum, weight_decay=weight_decay, nesterov=True, adjust_lr_fn="match_rms_adamw")
    adamw_groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                    {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    return MuonWithAdamW(muon, adamw(adamw_groups, learning_rate, betas, device_type))


def set_lr(optimizer: torch.optim.Optimizer, lr: float, learning_rate: float, muon_lr: float) -> None:
    """The schedule's lr for this step (between 0 and learning_rate): AdamW's groups take it, Muon's the
    same fraction of muon_lr."""
    fraction = lr / learning_rate if learning_rate > 0 else 0.0
    for group in optimizer.param_groups:
        group["lr"] = muon_lr * fraction if group.get("muon") else lr


def block_matrices(model: nn.Module) -> list[str]:
    """The names of the parameters Muon takes: the 2D weights inside the transformer blocks."""
    return [name for name, p in model.named_parameters() if name.startswith("transformer.h.") and p.dim() == 2]


# -----------------------------------------------------------------------------
# The learning-rate schedule


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
