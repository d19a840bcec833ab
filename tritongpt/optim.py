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

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed.tensor
from torch import nn

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
    if isinstance(param, torch.distributed.tensor.DTensor):
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


class Muon(torch.optim.Muon):
    """torch.optim.Muon, with the Newton-Schulz iterations in `ns_dtype`. In bfloat16 this is torch's own
    step; in float32 (for CPUs) the same update rule, written out, with float32 iterations."""

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if self.ns_dtype == torch.bfloat16:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(param.grad, 1 - momentum)
                update = param.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(update, self.ns_dtype, group["eps"])
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update.to(param.dtype), alpha=-lr * lr_ratio(group["adjust_lr_fn"], param.shape))
        return loss


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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss


def optimizer_for(model: GPT, config: dict, device_type: str) -> torch.optim.Optimizer:
    """build_optimizer with a run's config keys (train.py's: optimizer, learning_rate, weight_decay, beta1,
    beta2, muon_lr, muon_momentum)."""
    return build_optimizer(model, config["optimizer"], config["learning_rate"], config["weight_decay"],
                           (config["beta1"], config["beta2"]), device_type, config["muon_lr"], config["muon_momentum"])


def build_optimizer(model: GPT, optimizer: str, learning_rate: float, weight_decay: float,
                    betas: tuple[float, float], device_type: str, muon_lr: float = 0.02,
                    muon_momentum: float = 0.95) -> torch.optim.Optimizer:
    """The run's optimizer. 'adamw': nanoGPT's, with weight decay on the matrices (2D+) only. 'muon': Muon
    (lr muon_lr, Nesterov momentum muon_momentum) for the 2D weights inside the blocks, AdamW for the
    rest."""
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
    if any(isinstance(p, torch.distributed.tensor.DTensor) for _, p in params):
        raise ValueError("optimizer='muon' cannot run on FSDP's sharded parameters: torch.optim.Muon "
                         "orthogonalizes whole matrices, and each process holds a slice of each. Use "
                         "parallel='ddp' with muon, or optimizer='adamw' with fsdp")
    names = set(block_matrices(model))
    in_blocks = [p for name, p in params if name in names]
    chosen = {id(p) for p in in_blocks}
    rest = [p for _, p in params if id(p) not in chosen]
    ns_dtype = torch.bfloat16 if device_type == "cuda" else torch.float32  # what the device multiplies fast
    muon = Muon([{"params": in_blocks, "muon": True}], ns_dtype=ns_dtype, lr=muon_lr, momentum=muon_momentum,
                weight_decay=weight_decay, nesterov=True, adjust_lr_fn="match_rms_adamw")
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
