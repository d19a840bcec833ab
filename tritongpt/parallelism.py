"""How a run spreads over processes: the layout (data x tensor parallel), one DeviceMesh for it, and the
functions that apply tensor and data parallelism to a plain GPT, the way torchtitan composes them. The
model knows nothing of this: it runs on whatever shards these functions leave in it.

Tensor parallelism (Megatron-style, with DTensor's parallelize_module): in each block c_attn and c_fc are
split by output rows (column-wise), attention c_proj and MLP c_proj by input columns (row-wise), so a rank
holds n_head / tensor_parallel heads and a slice of the MLP, and the block costs two all-reduces forward
and two backward. The token embedding is split by vocabulary rows, the lm_head by vocabulary rows too (its
logits gathered), and a tied pair stays one tensor. The norms, the position embedding and dropout run on
the whole (replicated) activations on every rank of the tensor group: not sequence-parallel, which would
save activation memory but split every sequence across ranks (docs/scaling.md has the arithmetic).

c_attn holds q, k and v one after the other; a column-wise split needs each rank's q, k and v rows
together, so c_attn's rows are put in rank order before sharding, and back in nanoGPT's order wherever a
state dict leaves or enters the run (checkpoint.py calls `canonical_state` and `rank_order_state`).
"""
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # torch 2.5 has FSDP2 under its first name
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

from model import GPT, GPTConfig

MESH_DIMS = ("data", "pipeline", "tensor")  # tensor parallel innermost: neighbouring ranks, the fastest links
QKV_SUFFIXES = ("attn.c_attn.weight", "attn.c_attn.bias")
TENSOR_PARALLEL_DEVICES = ("cuda", "cpu")  # the device types with a collective backend (nccl, gloo)


class LayoutError(ValueError):
    """A layout that cannot run; the message says which setting to change."""


@dataclass(frozen=True)
class Layout:
    """How many processes split the batch (data), the layers (pipeline stages) and each layer (tensor), and
    where this one sits. Ranks count tensor fastest, then pipeline, then data."""

    data: int = 1
    pipeline: int = 1
    tensor: int = 1
    rank: int = 0

    @property
    def world_size(self) -> int:
        return self.data * self.pipeline * self.tensor

    @property
    def model_parallel(self) -> int:
        """How many processes share one model replica's work."""
        return self.pipeline * self.tensor

    @property
    def data_rank(self) -> int:
        """Which slice of the batch this process computes: the same for all ranks of one model replica."""
        return self.rank // self.model_parallel

    @property
    def pipeline_rank(self) -> int:
        return self.rank // self.tensor % self.pipeline

    def describe(self) -> str:
        return f"data parallel {self.data} x pipeline parallel {self.pipeline} x tensor parallel {self.tensor}"


def plan_layout(world_size: int, rank: int, tensor_parallel: int, pipeline_parallel: int = 1) -> Layout:
    """The layout of `world_size` processes into tensor groups of `tensor_parallel` and pipelines of
    `pipeline_parallel` stages; data parallel over what remains."""
    for name, degree in (("tensor_parallel", tensor_parallel), ("pipeline_parallel", pipeline_parallel)):
        if degree < 1:
            raise LayoutError(f"{name} must be >= 1, got {degree}")
    model_parallel = tensor_parallel * pipeline_parallel
    if world_size % model_parallel:
        raise LayoutError(
            f"{world_size} process(es) cannot be split into groups of tensor_parallel x pipeline_parallel = "
            f"{tensor_parallel} x {pipeline_parallel}: run a multiple of {model_parallel} processes "
            "(torchrun --nproc_per_node=...) or change tensor_parallel / pipeline_parallel"
        )
    return Layout(world_size // model_parallel, pipeline_parallel, tensor_parallel, rank)


def check_tensor_parallel(config: GPTConfig, tensor_parallel: int, device_type: str, dtype: str = "float32") -> None:
    """Errors before any work starts: what tensor parallelism cannot split, or cannot run on."""
    if tensor_parallel == 1:
        return
    if config.n_head % tensor_parallel:
        raise LayoutError(f"tensor_parallel={tensor_parallel} splits the attention heads across ranks: n_head="
                          f"{config.n_head} must be divisible by it; pick a tensor_parallel that divides n_head")
    mlp_width = 4 * config.n_embd
    if mlp_width % tensor_parallel:
        raise LayoutError(f"tensor_parallel={tensor_parallel} splits the MLP's {mlp_width} hidden units across "
                          "ranks: pick a tensor_parallel that divides 4 * n_embd")
    if device_type not in TENSOR_PARALLEL_DEVICES:
        raise LayoutError(f"tensor_parallel needs a collective backend for {device_type!r}, and torch.distributed "
                          f"has one for {' and '.join(TENSOR_PARALLEL_DEVICES)} only; set tensor_parallel=1")
    if dtype == "float16":
        raise LayoutError("dtype='float16' needs loss scaling, and torch's GradScaler cannot unscale gradients that "
                          "are partly tensor-parallel shards; use dtype='bfloat16' (GPUs since Ampere) or "
                          "tensor_parallel=1")


def build_mesh(layout: Layout, device_type: str) -> DeviceMesh:
    """One mesh for the whole run, (data, pipeline, tensor)."""
    return init_device_mesh(device_type, (layout.data, layout.pipeline, layout.tensor), mesh_dim_names=MESH_DIMS)


def blocks_of(model: GPT) -> list[torch.nn.Module]:
    """The transformer blocks a model holds: all of them, or a pipeline stage's (a dict by layer index)."""
    blocks = model.transformer.h
    return list(blocks.values()) if isinstance(blocks, torch.nn.ModuleDict) else list(blocks)


# -----------------------------------------------------------------------------
# c_attn's rows: nanoGPT's order [q; k; v] <-> rank order [q_0; k_0; v_0; q_1; k_1; v_1; ...]


def qkv_to_rank_order(tensor: torch.Tensor, tensor_parallel: int) -> torch.Tensor:
    """c_attn's weight (3C, C) or bias (3C,) from nanoGPT's row order to one where rank r's rows are its
    heads' q, k and v, contiguous, so that a plain column-wise split gives each rank its own heads."""
    rows = tensor.size(0) // 3
    grouped = tensor.reshape(3, tensor_parallel, rows // tensor_parallel, *tensor.shape[1:])
    return grouped.transpose(0, 1).reshape(tensor.shape)


def qkv_to_canonical(tensor: torch.Tensor, tensor_parallel: int) -> torch.Tensor:
    """The inverse of qkv_to_rank_order."""
    rows = tensor.size(0) // 3
    grouped = tensor.reshape(tensor_parallel, 3, rows // tensor_parallel, *tensor.shape[1:])
    return grouped.transpose(0, 1).reshape(tensor.shape)


# -----------------------------------------------------------------------------
# Applying the parallelisms to a plain model


def apply_tensor_parallel(model: GPT, mesh: DeviceMesh) -> None:
    """Shard the model's layers across the ranks of a 1-D `mesh` (in place), leaving each rank its slices.
    Every rank builds the same weights beforehand (from the same seed)."""
    tensor_parallel = mesh.size()
    for block in blocks_of(model):
        for param in block.attn.c_attn.parameters():
            with torch.no_grad():
                param.copy_(qkv_to_rank_order(param, tensor_parallel))
        parallelize_module(block, mesh, {
            "attn.c_attn": ColwiseParallel(), "attn.c_proj": RowwiseParallel(),
            "mlp.c_fc": ColwiseParallel(), "mlp.c_proj": RowwiseParallel(),
        })
    plan = {
        "transformer.wte": RowwiseParallel(input_layouts=Replicate()),  # a lookup: each rank owns some rows
        "lm_head": ColwiseParallel(output_layouts=Replicate()),  # the loss sees every logit
    }
    present = {name for name, _ in model.named_modules()}  # a pipeline stage may hold neither
    parallelize_module(model, mesh, {name: style for name, style in plan.items() if name in present})
    if model.config.tie_embeddings and {"transformer.wte", "lm_head"} <= present:
        # parallelize_module made the shared matrix into two DTensors: make them one again (same placement)
        model.lm_head.weight = model.transformer.wte.weight


def apply_data_parallel(model: torch.nn.Module, blocks: list[torch.nn.Module], mesh: DeviceMesh, parallel: str,
                        dtype: str) -> None:
    """Replicate ('ddp') or shard ('fsdp') a model (or a pipeline stage) across the ranks of a 1-D `mesh`,
    with FSDP2's engine for both (it composes with tensor-parallel DTensors and pipeline stages, which
    torch's DDP does not). Each block is its own unit, so its gradients reduce while the backward goes on;
    under bf16/fp16 parameters are cast (and gathered, when sharded) in that dtype and gradients reduced in
    fp32."""
    if parallel == "ddp":
        from torch.distributed._composable.replicate_with_fsdp import replicate as wrap
    else:
        wrap = fully_shard
    policy = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
    for block in blocks:
        wrap(block, mesh=mesh, mp_policy=policy)
    wrap(model, mesh=mesh, mp_policy=policy)


def tensor_parallel_degree(model: torch.nn.Module) -> int:
    """The size of the tensor mesh dimension the model's c_attn is sharded on (1: none)."""
    param = next(p for name, p in model.named_parameters() if name.endswith(QKV_SUFFIXES[0]))
    if not isinstance(param, DTensor) or "tensor" not in (param.device_mesh.mesh_dim_names or ()):
        return 1
    return param.device_mesh["tensor"].size()


# -----------------------------------------------------------------------------
# State dicts in nanoGPT's order


def _qkv_paths(state: dict):
    """Where c_attn's tensors are in {"model": ..., "optimizer": ...} state dicts (DCP's, keyed by name):
    the weights, and their optimizer states (exp_avg, ...), in the nested or the flat optimizer form."""
    for key in state["model"]:
        if key.endswith(QKV_SUFFIXES):
            yield ("model", key)
    optim = state.get("optimizer", {})
    if isinstance(optim.get("state"), dict):  # nested: state -> parameter name -> entry
        for fqn, param_state in optim["state"].items():
            if fqn.endswith(QKV_SUFFIXES):
                for name, value in param_state.items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0:
                        yield ("optimizer", "state", fqn, name)
        return
    for key, value in optim.items():  # flat: "state.<parameter name>.<entry>"
        fqn = key.rsplit(".", 1)[0]
        if key.startswith("state.") and fqn.endswith(QKV_SUFFIXES) and isinstance(value, torch.Tensor) and value.dim():
            yield ("optimizer", key)


def _get(state: dict, path: tuple):
    for key in path:
        state = state[key]
    return state


def _set(state: dict, path: tuple, value) -> None:
    _get(state, path[:-1])[path[-1]] = value


def _copy(state: dict) -> dict:
    """A copy of the dicts that hold c_attn's tensors: get_state_dict's optimizer entries are the
    optimizer's own per-parameter dicts, which must not change."""
    copy = {"model": dict(state["model"])}
    if "optimizer" in state:
        optim = state["optimizer"]
        if isinstance(optim.get("state"), dict):
            copy["optimizer"] = {**optim, "state": {fqn: dict(s) for fqn, s in optim["state"].items()}}
        else:
            copy["optimizer"] = dict(optim)
    return copy


def canonical_state(state: dict, tensor_parallel: int) -> dict:
    """`state` with c_attn's sharded tensors made whole plain tensors in nanoGPT's order, as checkpoints
    store them (DCP writes a plain tensor once, whatever the layout)."""
    if tensor_parallel == 1:
        return state
    state = _copy(state)
    for path in list(_qkv_paths(state)):
        _set(state, path, qkv_to_canonical(_get(state, path).full_tensor(), tensor_parallel))
    return state


def canonical_placeholders(state: dict, tensor_parallel: int) -> dict:
    """`state`, or for tensor parallelism a copy for DCP to load into with whole plain tensors where c_attn's
    are shards."""
    if tensor_parallel == 1:
        return state
    state = _copy(state)
    for path in list(_qkv_paths(state)):
        like = _get(state, path)
        _set(state, path, torch.empty(like.shape, dtype=like.dtype, device=like.device_mesh.device_type))
    return state


def rank_order_state(state: dict, tensor_parallel: int, template: dict | None = None) -> None:
    """In place: c_attn's whole tensors, in nanoGPT's order, put in rank order; and sharded like the
    tensors at the same place in `template` when one is given (without one they stay whole, for
    set_state_dict's full_state_dict mode)."""
    if tensor_parallel == 1:
        return
    for path in list(_qkv_paths(state)):
        whole = qkv_to_rank_order(_get(state, path), tensor_parallel)
        if template is not None:
            like = _get(template, path)
            # every rank holds the whole tensor: each keeps its own slice, no communication
            whole = distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)
        _set(state, path, whole)
