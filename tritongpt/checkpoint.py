"""Checkpoints: where they live in out_dir, what they hold, and the one way to write and read each kind.

- `ckpt.pt`: nanoGPT's format, one file: model, optimizer, model_args, iter_num, best_val_loss, config, plus
  keys of ours that nanoGPT ignores (scaler, rng, gelu_approximate, evals_since_best). One process and DDP.
- `ckpt_dcp/`: the sharded form FSDP, tensor and pipeline parallelism write: DCP shards of the model and
  optimizer, one file per rank, and `train_state.pt` holding the rest. Any layout can read it back, one
  process included.
- With always_save_checkpoint=False, `ckpt.pt` (`ckpt_dcp/`) is the best model so far and is never
  overwritten by a worse one; the latest state, when it is newer, is `ckpt_latest.pt` (`ckpt_latest_dcp/`).
  init_from='resume' continues from whichever is newer; sample.py reads the best.

Loading never runs code: every file is read with torch.load(weights_only=True), DCP's pickled
metadata is checked by a restricted unpickler before DCP reads it, a sharded checkpoint's model entries
must be tensors, and its other entries are read with weights_only=True too. Our checkpoints hold only tensors,
numbers, strings, lists and dicts; a file that needs more is refused with an error naming it.
"""
import dataclasses
import enum
import io
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.tensor
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from tritongpt import parallelism
from tritongpt import pipeline
from tritongpt.fileio import CheckpointError, atomic_open, load_file
from model import GPT, SWITCHES, GPTConfig, gelu_approximate, set_gelu_approximate

CKPT_FILE = "ckpt.pt"
LATEST_FILE = "ckpt_latest.pt"
SHARDED_DIR = "ckpt_dcp"
LATEST_SHARDED_DIR = "ckpt_latest_dcp"
TRAIN_STATE = "train_state.pt"  # in a sharded checkpoint: everything but the model and optimizer
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)  # how sharded checkpoints hold the optimizer
MODEL_ARG_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
ARCHITECTURE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")
# train.py's keys that a model resumed or loaded from pretrained weights keeps from where it came (block_size
# may shrink: train.py crops it)
FIXED_ARCHITECTURE_KEYS = ("n_layer", "n_head", "n_embd", "bias", *SWITCHES)


# -----------------------------------------------------------------------------
# Reading sharded checkpoints safely (plain files: fileio.load_file)


class _MetadataUnpickler(pickle.Unpickler):
    """DCP pickles its .metadata file (dataclasses describing the shards) and unpickles it with no
    restriction: this reads it first, allowing only what DCP writes there: its own dataclasses and enums,
    torch sizes, dtypes and layouts, and paths. Nothing else can be called, so nothing else can run."""

    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
               ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
               ("pathlib", "PureWindowsPath")}

    def find_class(self, module: str, name: str):
        found = super().find_class(module, name) if self._may_import(module, name) else None
        if (module, name) in self.ALLOWED or isinstance(found, torch.dtype):
            return found
        if module.startswith("torch.distributed.checkpoint.") and isinstance(found, type) and (
                dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)):
            return found
        raise pickle.UnpicklingError(f"Unsupported global: {module}.{name}")

    @staticmethod
    def _may_import(module: str, name: str) -> bool:
        """Importing runs a module's code: only torch's own modules and pathlib/collections are looked in."""
        return module in ("torch", "pathlib", "collections", "torch.serialization") or \
            module.startswith("torch.distributed.checkpoint.")


def read_metadata(path: Path):
    """DCP's .metadata, read with the restricted unpickler."""
    return _MetadataUnpickler(io.BytesIO((path / ".metadata").read_bytes())).load()


class _PlainValuesLoadPlanner(dcp.DefaultLoadPlanner):
    """DCP keeps a checkpoint's non-tensor entries (an optimizer's lr, betas, step counts) as torch.save
    bytes and reads them back with torch.load(weights_only=False), which runs whatever a crafted entry
    asks. This reads them with weights_only=True first: only tensors, numbers, strings, lists and dicts get
    through (anything else is an UnpicklingError), and DCP's own reader then sees them re-saved by us."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        plain = torch.load(value, map_location="cpu", weights_only=True)
        checked = io.BytesIO()
        torch.save(plain, checked)
        checked.seek(0)
        super().load_bytes(read_item, checked)


def optimizer_state_is_flat(path: Path) -> bool:
    """Whether a sharded checkpoint keys the optimizer's param groups by parameter name ("flat", what this
    version writes: each pipeline stage holds other parameters, so groups numbered per stage would clash)
    or by group number (the nested form, written before pipeline parallelism)."""
    keys = read_metadata(path).state_dict_metadata
    return not any(key.startswith("optimizer.param_groups.") and key.split(".")[2].isdigit() for key in keys)


def check_sharded(path: str | Path) -> None:
    """Check that a sharded checkpoint directory is whole and safe to hand to DCP."""
    path = Path(path)
    metadata = path / ".metadata"
    if not metadata.is_file() or not (path / TRAIN_STATE).is_file():
        raise CheckpointError(f"{path} is not a whole sharded checkpoint (no .metadata or {TRAIN_STATE}); delete it "
                              "and resume from another checkpoint")
    try:
        entries = read_metadata(path).state_dict_metadata
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"refusing to load {metadata}: {error}; unpickling it could run code") from None
    except Exception as error:  # a torn pickle fails with almost any exception type
        raise CheckpointError(f"{metadata} is truncated or corrupt ({type(error).__name__}); delete {path} and "
                              "resume from another checkpoint") from None
    not_tensors = [key for key, entry in entries.items()
                   if key.startswith("model.") and not isinstance(entry, TensorStorageMetadata)]
    if not_tensors:
        raise CheckpointError(f"refusing to load {path}: its model entries must be tensors, and "
                              f"{', '.join(not_tensors[:3])} are not; delete it and resume from another checkpoint")


def check_train_state(state: dict, path: Path) -> dict:
    """The checkpoint's entries this project needs, with nanoGPT's tensor best_val_loss made a float."""
    missing = [key for key in ("model_args", "iter_num") if key not in state]
    missing += [f"model_args['{key}']" for key in ARCHITECTURE_KEYS if key not in state.get("model_args", {})]
    if missing:
        raise CheckpointError(f"{path} is not a nanoGPT/tritongpt checkpoint: it lacks {', '.join(missing)}")
    state["best_val_loss"] = float(state.get("best_val_loss", float("inf")))
    return state


# -----------------------------------------------------------------------------
# Finding checkpoints


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint found in out_dir: its path, whether it is sharded, and its contents (for a sharded
    one, train_state.pt only: the shards are read into a model by load_weights)."""

    path: Path
    sharded: bool
    state: dict

    @property
    def iter_num(self) -> int:
        return int(self.state["iter_num"])


def sharded_path(out_dir: str | Path, name: str = SHARDED_DIR) -> Path | None:
    """A sharded checkpoint directory, or the previous one where a save died between its two renames."""
    for path in (Path(out_dir) / name, Path(out_dir) / f"{name}.old"):
        if path.is_dir():
            return path
    return None


def read_checkpoint(path: Path, sharded: bool) -> Checkpoint:
    if sharded:
        check_sharded(path)
        return Checkpoint(path, True, check_train_state(load_file(path / TRAIN_STATE), path))
    return Checkpoint(path, False, check_train_state(load_file(path), path))


def find(out_dir: str | Path, latest: bool) -> Checkpoint | None:
    """The checkpoint to resume from (latest=True: the newest of best and latest) or to sample from
    (latest=False: the best, or the latest if there is no best), plain or sharded."""
    out_dir = Path(out_dir)
    found = []
    for file, directory in ((CKPT_FILE, SHARDED_DIR), (LATEST_FILE, LATEST_SHARDED_DIR)):
        # a run resumed on another layout writes the other form: the newer of the two is this slot's
        forms = [read_checkpoint(out_dir / file, sharded=False)] if (out_dir / file).is_file() else []
        if (path := sharded_path(out_dir, directory)) is not None:
            forms.append(read_checkpoint(path, sharded=True))
        if forms:
            found.append(max(forms, key=lambda c: c.iter_num))
        if found and not latest:
            break
    return max(found, key=lambda c: c.iter_num) if found else None


def require(out_dir: str | Path, latest: bool) -> Checkpoint:
    checkpoint = find(out_dir, latest)
    if checkpoint is None:
        raise CheckpointError(
            f"no checkpoint in {out_dir} (looked for {CKPT_FILE}, {LATEST_FILE}, {SHARDED_DIR}/ and "
            f"{LATEST_SHARDED_DIR}/); train one first (init_from='scratch'), or set out_dir"
        )
    return checkpoint


# -----------------------------------------------------------------------------
# Models and optimizers from checkpoints


def clean_state_dict(state_dict: dict) -> dict:
    """Make a saved state dict loadable: drop torch.compile's `_orig_mod.` prefix and the causal-mask
    buffers (`.attn.bias`) that nanoGPT saves when it runs without flash attention."""
    prefix = "_orig_mod."
    cleaned = {}
    for key, value in state_dict.items():
        key = key[len(prefix):] if key.startswith(prefix) else key
        if key.endswith(".attn.bias") and value.dim() == 4:
            continue
        cleaned[key] = value
    return cleaned


def model_args_of(model: GPT) -> dict:
    """The model_args a checkpoint records: nanoGPT's, plus the modern-recipe switches that are on (so a
    GPT-2-shaped model's are exactly nanoGPT's, and nanoGPT's sample.py reads its checkpoints)."""
    return {**{key: getattr(model.config, key) for key in MODEL_ARG_KEYS}, **model.config.switches_on()}


def build_model(checkpoint: Checkpoint, attn_impl: str = "auto", ln_impl: str = "auto", dropout: float | None = None,
                load_weights: bool = True) -> GPT:
    """The GPT a checkpoint describes, with its weights (unless load_weights=False: FSDP loads them once
    the model is sharded). dropout, when given, replaces the saved one (it may change on resume)."""
    model_args = dict(checkpoint.state["model_args"])
    if dropout is not None:
        model_args["dropout"] = dropout
    model = GPT(GPTConfig.from_dict(model_args), attn_impl, ln_impl)
    # a finetuned GPT-2 keeps GPT-2's tanh GELU; nanoGPT's checkpoints have no such key (exact GELU)
    set_gelu_approximate(model, checkpoint.state.get("gelu_approximate", "none"))
    if load_weights:
        load_weights_into(checkpoint, model)
    return model


def keep_architecture(model_config: GPTConfig, config: dict, given: set[str], source: str) -> dict:
    """A run's config for a model whose architecture comes from `source` (a checkpoint, pretrained weights):
    an architecture key the user set to another value is a ValueError (it cannot apply, and dropping it
    silently would train something else than asked); the others take the model's values, so the config a
    checkpoint saves agrees with its model_args."""
    conflicts = [f"{key}={config[key]!r} (it has {getattr(model_config, key)!r})" for key in FIXED_ARCHITECTURE_KEYS
                 if key in given and key in config and config[key] != getattr(model_config, key)]
    if conflicts:
        raise ValueError(f"the model from {source} keeps its architecture, so {', '.join(conflicts)} cannot apply; "
                         "drop the setting, or train a new model (init_from='scratch') in another out_dir")
    return {**config, **{key: getattr(model_config, key) for key in FIXED_ARCHITECTURE_KEYS if key in config}}


def check_finite_weights(model: torch.nn.Module, source: str | Path) -> None:
    """Weights that are NaN or infinite cannot train: refuse them where they were loaded, naming the fix."""
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, torch.distributed.tensor.DTensor) else param
        if not bool(torch.isfinite(local.detach()).all()):
            raise CheckpointError(f"{source} holds non-finite weights ({name} has NaN or infinite values), saved by a "
                                  "run that diverged; resume from an earlier checkpoint or train again")


def tensor_bytes(state: object) -> int:
    """The bytes of the tensors in a (nested) state dict: about what torch.save of it writes."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(value) for value in state)
    return 0


def is_sharded(model: torch.nn.Module) -> bool:
    """FSDP2 keeps each parameter as a DTensor sharded across the processes."""
    return any(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())


IMPLEMENTATION_KEYS = ("fused", "foreach")  # how an optimizer steps, not what it computes


def load_weights_into(checkpoint: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                      make_optimizer: Callable[[GPT], torch.optim.Optimizer] | None = None) -> None:
    """Load a checkpoint into a model and optimizer (see _load_weights_into). The optimizer keeps its own
    way of stepping: a saved param group says fused=True after a one-process run, which a tensor-parallel
    optimizer (optim.adamw) cannot do, and the reverse would make a one-process run step slowly."""
    if optimizer is None:
        _load_weights_into(checkpoint, model, None, make_optimizer)
        return
    own = [{key: group[key] for key in IMPLEMENTATION_KEYS if key in group} for group in optimizer.param_groups]
    _load_weights_into(checkpoint, model, optimizer, make_optimizer)
    for group, keys in zip(optimizer.param_groups, own):
        group.update(keys)


def _load_weights_into(checkpoint: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                       make_optimizer: Callable[[GPT], torch.optim.Optimizer] | None) -> None:
    """Load a checkpoint's model (and optimizer) state into a model, plain or sharded (FSDP, tensor
    parallel), on any layout.

    A sharded checkpoint is read by DCP, which loads whatever part of each tensor a process holds, whatever
    the layout that saved it (c_attn is stored whole in nanoGPT's row order, and put in the model's
    order here: parallelism.py). A plain one loads directly into a plain model; into a sharded one it
    first loads into a plain copy on the CPU with an optimizer from `make_optimizer` (a plain optimizer
    state is keyed by parameter index), which torch's state-dict helpers then shard."""
    tensor_parallel = parallelism.tensor_parallel_degree(model)
    if checkpoint.sharded:
        with warnings.catch_warnings():  # DCP warns when it runs in a single process: a supported use here
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            if optimizer is None:
                template = {"model": get_model_state_dict(model)}
            else:
                options = StateDictOptions(flatten_optimizer_state_dict=optimizer_state_is_flat(checkpoint.path))
                model_state, optim_state = get_state_dict(model, optimizer, options=options)
                template = {"model": model_state, "optimizer": optim_state}
            state = parallelism.canonical_placeholders(template, tensor_parallel)
            try:
                dcp.load(state, checkpoint_id=checkpoint.path, planner=_PlainValuesLoadPlanner())
            except CheckpointException as error:
                unpickling = [e for e, _ in error.failures.values() if isinstance(e, pickle.UnpicklingError)]
                if not unpickling:
                    raise
                raise CheckpointError(
                    f"refusing to load {checkpoint.path}: an entry holds objects other than tensors, numbers, "
                    f"strings, lists and dicts ({str(unpickling[0]).splitlines()[0]}), and unpickling those could "
                    "run code. Only load checkpoints you trust; tritongpt checkpoints never need this") from None
            parallelism.rank_order_state(state, tensor_parallel, template)
            if optimizer is None:
                set_model_state_dict(model, state["model"])
            else:
                set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                               options=options)
        return
    for key in ("model",) + (("optimizer",) if optimizer is not None else ()):
        if key not in checkpoint.state:
            raise CheckpointError(f"{checkpoint.path} has no '{key}' entry to load; it holds weights only "
                                  "(use it with init_from=resume only if it was saved by train.py)")
    partial = pipeline.is_pipeline_part(model)
    if not is_sharded(model) and not partial:
        try:
            model.load_state_dict(clean_state_dict(checkpoint.state["model"]))
        except RuntimeError as error:  # tensors missing, unexpected, or of other shapes than model_args make
            detail = " ".join(str(error).split())
            raise CheckpointError(f"{checkpoint.path}: its weights do not fit the model its model_args describe "
                                  f"({detail[:300]}); the file was edited or mixed up, delete it and resume from "
                                  "another checkpoint") from None
        if optimizer is not None:
            optimizer.load_state_dict(checkpoint.state["optimizer"])
        return
    plain_model = build_model(checkpoint, "sdpa", "torch")
    full = StateDictOptions(full_state_dict=True)
    if optimizer is None:
        state = {"model": plain_model.state_dict()}
        state = pipeline.own_state(state, model) if partial else state
        parallelism.rank_order_state(state, tensor_parallel)
        set_model_state_dict(model, state["model"], options=full)
        return
    plain_optimizer = make_optimizer(plain_model)
    plain_optimizer.load_state_dict(checkpoint.state["optimizer"])
    model_state, optim_state = get_state_dict(plain_model, plain_optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    state = pipeline.own_state(state, model) if partial else state
    parallelism.rank_order_state(state, tensor_parallel)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=full)


# -----------------------------------------------------------------------------
# Writing


def train_state(model: GPT, iter_num: int, best_val_loss: float, config: dict, scaler_state: dict, rng: dict,
                evals_since_best: int = 0) -> dict:
    """What a checkpoint holds besides the model and optimizer: plain values and tensors only."""
    return {
        "model_args": model_args_of(model), "iter_num": iter_num, "best_val_loss": best_val_loss, "config": config,
        "scaler": scaler_state, "rng": rng, "gelu_approximate": gelu_approximate(model),
        "evals_since_best": evals_since_best,
    }


def save(out_dir: str | Path, latest: bool, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
         sharded: bool, master: bool) -> Path:
    """Write a checkpoint (the best/main one, or the latest), atomically: a run killed at any moment leaves
    the old checkpoint or the new one, never a torn one. Every process calls this; for a sharded save
    each writes its shards (out_dir must then be shared by the nodes)."""
    out_dir = Path(out_dir)
    if not sharded:
        path = out_dir / (LATEST_FILE if latest else CKPT_FILE)
        if master:
            everything = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **state}
            with atomic_open(path, size_hint=tensor_bytes(everything)) as f:
                torch.save(everything, f)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # no rank moves on (and perhaps exits) before the file is whole
        return path
    path = out_dir / (LATEST_SHARDED_DIR if latest else SHARDED_DIR)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if master:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    torch.distributed.barrier()
    model_state, optim_state = get_state_dict(model, optimizer, options=FLAT)
    state_dicts = {"model": model_state, "optimizer": optim_state}
    dcp.save(parallelism.canonical_state(state_dicts, parallelism.tensor_parallel_degree(model)), checkpoint_id=tmp)
    if master:
        with atomic_open(tmp / TRAIN_STATE) as f:
            torch.save(state, f)
        # a directory cannot be renamed over another, hence two renames
        if path.is_dir():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()
    return path


def remove_latest(out_dir: str | Path) -> None:
    """Drop the latest-state checkpoint once the main one is newer (best and latest are then the same)."""
    out_dir = Path(out_dir)
    (out_dir / LATEST_FILE).unlink(missing_ok=True)
    shutil.rmtree(out_dir / LATEST_SHARDED_DIR, ignore_errors=True)


def consolidate(out_dir: str | Path, make_optimizer: Callable[[GPT, dict], torch.optim.Optimizer]) -> list[Path]:
    """Sharded -> nanoGPT format: ckpt_dcp/ -> ckpt.pt (and ckpt_latest_dcp/ -> ckpt_latest.pt), by loading
    the shards into one plain model and optimizer on the CPU; `make_optimizer(model, config)` builds the
    optimizer the run used, from the config it saved. Returns the files written."""
    written = []
    for directory, file in ((SHARDED_DIR, CKPT_FILE), (LATEST_SHARDED_DIR, LATEST_FILE)):
        path = sharded_path(out_dir, directory)
        if path is None:
            continue
        checkpoint = read_checkpoint(path, sharded=True)
        model = build_model(checkpoint, "sdpa", "torch", load_weights=False)
        optimizer = make_optimizer(model, checkpoint.state.get("config", {}))
        load_weights_into(checkpoint, model, optimizer)
        everything = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **checkpoint.state}
        with atomic_open(Path(out_dir) / file, size_hint=tensor_bytes(everything)) as f:
            torch.save(everything, f)
        written.append(Path(out_dir) / file)
    if not written:
        raise CheckpointError(f"--consolidate=True reads the sharded checkpoint of an fsdp run, {Path(out_dir) / SHARDED_DIR}: "
                              "not found")
    return written


# -----------------------------------------------------------------------------
# Random number generators (dropout): every rank's state, so a resume on the same layout is exact


def rng_states(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def gather_rng_states(device: torch.device, world_size: int, model_layout: tuple[int, int] = (1, 1)) -> dict:
    """Every rank's RNG states, collected on all ranks (the master saves them), and the layout they
    belong to."""
    states = [rng_states(device)]
    if world_size > 1:
        states = [None] * world_size
        torch.distributed.all_gather_object(states, rng_states(device))
    return {
        "world_size": world_size,
        "model_layout": list(model_layout),  # (pipeline, tensor) parallel
        "torch": [s["torch"] for s in states],
        "cuda": [s["cuda"] for s in states] if device.type == "cuda" else None,
    }


def restore_rng_states(rng: dict | None, device: torch.device, rank: int, world_size: int,
                       model_layout: tuple[int, int] = (1, 1)) -> bool:
    """Restore this rank's RNG states when the checkpoint was saved on the same layout; on another one,
    dropout masks simply start afresh. Returns whether they were restored."""
    if rng is None or rng.get("world_size") != world_size or rng.get("model_layout", [1, 1]) != list(model_layout):
        return False
    torch.set_rng_state(rng["torch"][rank])
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"][rank], device)
    return True
