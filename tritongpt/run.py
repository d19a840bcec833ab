"""Setting a training run up, as train.py does: where the model comes from (from scratch, a checkpoint or
GPT-2's weights), and torchtitan's shape for parallelism: checks of the layout before any work, then one
function that applies it (pipeline stages, tensor parallelism, FSDP or DDP, torch.compile) to a plain model
and returns what the loop needs, with one training step for a plain model and a pipeline alike.
"""
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT, GPTConfig
from tritongpt import checkpoint as ckpt
from tritongpt import loop, parallelism, pipeline
from tritongpt.configurator import UserError
from tritongpt.data import Batch
from tritongpt.parallelism import Layout

# -----------------------------------------------------------------------------
# The model at the start


@dataclass
class Start:
    """The model a run starts from, and where: a resumed run's step, best loss and early-stopping count."""

    model: GPT
    checkpoint: ckpt.Checkpoint | None  # its weights are loaded once the model is in place (sharded, perhaps)
    config: dict  # the run's config, its architecture keys as the model's (what a checkpoint saves)
    init_from: str
    iter_num: int = 0
    best_val_loss: float = float("inf")
    evals_since_best: int = 0


def start_model(config: dict, given: set[str], data_vocab_size: int | None, restarted: bool) -> Start:
    """The model for config['init_from']: 'scratch' (vocabulary from the data, else GPT-2's padded 50304),
    'resume' (from out_dir's newest checkpoint; also after torchrun restarted the workers), or GPT-2 weights.
    The architecture keys of a resumed or pretrained model cannot change (ckpt.keep_architecture); a
    pretrained model's block_size may shrink."""
    init_from = config["init_from"]
    if restarted and ckpt.find(config["out_dir"], latest=True) is not None:
        init_from = "resume"  # torchrun restarted the workers after a failure: carry on from the last checkpoint
    impls = (config["attn_impl"], config["ln_impl"])
    if init_from == "scratch":
        vocab_size = data_vocab_size if data_vocab_size is not None else 50304
        start = Start(GPT(GPTConfig.from_dict({**config, "vocab_size": vocab_size}), *impls), None, config, init_from)
    elif init_from == "resume":
        # the architecture comes from the checkpoint; dropout may be changed on resume
        checkpoint = ckpt.require(config["out_dir"], latest=True)
        model = ckpt.build_model(checkpoint, *impls, dropout=config["dropout"], load_weights=False)
        config = ckpt.keep_architecture(model.config, config, given, checkpoint.path)
        start = Start(model, checkpoint, config, init_from, checkpoint.iter_num, checkpoint.state["best_val_loss"],
                      checkpoint.state.get("evals_since_best", 0))
    else:
        model = GPT.from_pretrained(init_from, dict(dropout=config["dropout"]), *impls)
        start = Start(model, None, ckpt.keep_architecture(model.config, config, given, f"init_from={init_from!r}"),
                      init_from)
    if config["block_size"] > start.model.config.block_size:
        raise UserError(f"block_size={config['block_size']} is larger than the model's {start.model.config.block_size}")
    if config["block_size"] < start.model.config.block_size:
        if start.checkpoint is not None:
            # its optimizer state (and a sharded checkpoint's layout) holds every position of the model's
            raise UserError(f"block_size={config['block_size']} is smaller than the {start.model.config.block_size} "
                            f"of {start.checkpoint.path}, and a resumed run continues that model and its optimizer "
                            f"as they are: resume with block_size={start.model.config.block_size}")
        start.model.crop_block_size(config["block_size"])
    return start


def load_checkpoint(start: Start, model: GPT, optimizer: torch.optim.Optimizer,
                    make_optimizer: Callable[[GPT], torch.optim.Optimizer], scaler: torch.amp.GradScaler,
                    device: torch.device, rank: int, world_size: int, layout: Layout) -> None:
    """A resumed run's weights, optimizer state, loss scale and RNG states, into the model in its layout
    (sharded, perhaps); then the checkpoint's memory is let go."""
    checkpoint, start.checkpoint = start.checkpoint, None
    if checkpoint is None:
        return
    ckpt.load_weights_into(checkpoint, model, optimizer, make_optimizer)
    ckpt.check_finite_weights(model, checkpoint.path)
    if checkpoint.state.get("scaler"):
        scaler.load_state_dict(checkpoint.state["scaler"])
    ckpt.restore_rng_states(checkpoint.state.get("rng"), device, rank, world_size, (layout.pipeline, layout.tensor))


# -----------------------------------------------------------------------------
# The layout


def check_layout(model: GPT, config: dict, layout: Layout, accumulation: int, dtype: str, device_type: str) -> str:
    """Errors before any work starts for what the layout cannot run; returns the training loss's
    implementation for it (tensor and pipeline parallel runs take the loss of the lm_head's logits)."""
    parallelism.check_tensor_parallel(model.config, layout.tensor, device_type, dtype)
    pipeline.check_pipeline(model.config, layout, config["pipeline_schedule"], config["pipeline_stages_per_rank"],
                            accumulation, dtype)
    if layout.model_parallel == 1:
        return config["ce_impl"]
    if config["ce_impl"] == "triton":
        raise UserError("ce_impl='triton' needs the whole lm_head in one process: tensor and pipeline parallel runs "
                        "take the loss of the lm_head's logits; use ce_impl='auto' or 'torch'")
    return "torch"


def place(model: GPT, layout: Layout, config: dict, device: torch.device) -> tuple[GPT, list[torch.nn.Module]]:
    """The model on its device, and what data parallelism wraps: the model, or this rank's pipeline stages
    (every rank built the whole model, alike from the seed, on the CPU; only its stages go to the device)."""
    stages = [model]
    if layout.pipeline > 1:
        model, stages = pipeline.split_model(model, layout, config["pipeline_schedule"],
                                             config["pipeline_stages_per_rank"])
    return model.to(device), stages


@dataclass
class Parallelized:
    """What the training loop needs of a model in its layout."""

    model: torch.nn.Module  # what the loop calls: compiled, and wrapped by DDP or the pipeline
    raw_model: GPT  # without those wrappers: what the optimizer steps and a checkpoint saves
    pipe: pipeline.Pipeline | None
    sync_gradients: Callable[[bool], None] | None  # DDP's and FSDP's gradient reduction, on the last micro-step
    sharded: bool  # checkpoints in DCP's sharded form
    data_group: object  # the data-parallel process group evaluation gathers over, when it is not all ranks
    replica_group: object = None  # the process group torch's DDP replicates the plain parameters over (Muon shares
    #                              its work there; sharded and tensor-parallel parameters are DTensors that know theirs)

    def train_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   get_batch: Callable[[int], Batch], accumulation: int, grad_clip: float, autocast) -> torch.Tensor:
        """One optimizer step over `accumulation` micro-batches: the mean loss, on the device."""
        if self.pipe is not None:
            return pipeline.train_step(self.pipe, optimizer, scaler, get_batch, accumulation, grad_clip, autocast)
        return loop.train_step(self.model, optimizer, scaler, get_batch, accumulation, grad_clip, autocast,
                               self.sync_gradients)


def parallelize(model: GPT, stages: list[torch.nn.Module], layout: Layout, config: dict, dtype: str, compile: bool,
                accumulation: int, device: torch.device, local_rank: int, distributed: bool,
                log: Callable[[str], None]) -> Parallelized:
    """Apply the layout to a placed model whose implementations are chosen: tensor parallelism over the mesh's
    tensor dimension, FSDP2 (or, with model parallelism, FSDP's engine) over its data dimension, torch.compile
    (the blocks only, under a pipeline, whose stages run their own code between them), the pipeline's
    schedule, and DDP for plain data parallelism."""
    fsdp = config["parallel"] == "fsdp"
    fsdp_engine = fsdp or (layout.model_parallel > 1 and layout.data > 1)
    mesh = parallelism.build_mesh(layout, device.type) if distributed else None
    if layout.tensor > 1:
        parallelism.apply_tensor_parallel(model, mesh["tensor"])
    if fsdp_engine:
        for stage in stages:
            blocks = parallelism.blocks_of(model) if stage is model else list(stage.blocks)
            parallelism.apply_data_parallel(stage, blocks, mesh["data"], config["parallel"], dtype)
        pipeline.retie(model)
    raw_model = wrapped = model
    if compile:
        log("compiling the model... (takes a ~minute)")
        if layout.pipeline > 1:
            for block in parallelism.blocks_of(model):
                block.compile()
        else:
            wrapped = torch.compile(model)
    pipe = None
    if layout.pipeline > 1:
        pipe = wrapped = pipeline.Pipeline(raw_model, stages, layout, mesh, config["pipeline_schedule"], accumulation,
                                           device)
        log(pipeline.describe(config["pipeline_schedule"], layout, accumulation, len(stages), raw_model.config.n_layer))
    replica_group = None
    if distributed and not fsdp_engine and layout.model_parallel == 1:
        wrapped = DDP(wrapped, device_ids=[local_rank] if device.type == "cuda" else None)
        replica_group = torch.distributed.group.WORLD
    data_group = mesh["data"].get_group() if layout.data > 1 and layout.model_parallel > 1 else None
    return Parallelized(wrapped, raw_model, pipe, loop.gradient_sync_switch(wrapped, raw_model),
                        fsdp or layout.model_parallel > 1, data_group, replica_group)
