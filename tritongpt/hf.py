"""GPT-2 weights in Hugging Face's format: read them into our GPT (from the hub or a local directory) and
write them back, with no need for `transformers`. GPT.from_pretrained and GPT.save_pretrained (model.py)
call these functions, which know the format, not the model: they take its config's fields and its
tensors by name.

Hugging Face's GPT2LMHeadModel uses our parameter names (nanoGPT took them from OpenAI's GPT-2), with
two differences in storage: its Conv1D layers keep Linear weights transposed, as (in, out), and the
lm_head, tied to wte, is not stored at all.

One difference in the math: GPT-2's MLP uses the tanh approximation of GELU ("gelu_new"), nanoGPT the
exact one. Even a randomly initialized GPT-2 (124M) has logits ~1e-3 apart under the two, so a model
loaded from HF weights runs its GELUs with approximate="tanh" and matches HF's logits. This is a setting
of the modules (model.set_gelu_approximate), not a GPTConfig field, so checkpoints keep nanoGPT's
model_args; checkpoint.py records it under a key of its own, which nanoGPT ignores.
"""
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from tritongpt import hub
from tritongpt.fileio import DownloadError, atomic_open, download, load_file

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # 124M, 350M, 774M and 1558M parameters
CACHE_ENV = "TRITONGPT_CACHE"  # downloads go to $TRITONGPT_CACHE/<name>, by default ~/.cache/tritongpt/<name>
HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"  # a sharded checkpoint: which shard holds each tensor
HF_PYTORCH_BIN = "pytorch_model.bin"
HF_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# the weights that HF's GPT-2 pairs with a bias (a bias=False model's are written as zeros)
HF_BIASED_WEIGHTS = (*HF_CONV1D_WEIGHTS, "ln_1.weight", "ln_2.weight", "ln_f.weight")
HF_GELU_APPROXIMATE = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}  # nn.GELU's name
# GPT2Config's defaults: transformers leaves a key out of config.json when it has its default value.
HF_GPT2_DEFAULTS = dict(
    vocab_size=50257,
    n_positions=1024,
    n_embd=768,
    n_layer=12,
    n_head=12,
    n_inner=None,
    activation_function="gelu_new",
    layer_norm_epsilon=1e-5,
    scale_attn_weights=True,
    scale_attn_by_inverse_layer_idx=False,
    tie_word_embeddings=True,
)
GPT2_EOT = 50256  # <|endoftext|>, GPT-2's bos and eos token


def gpt2_download(name: str) -> Path:
    """The cache directory of a GPT-2 size, after downloading its config and weights there if needed: from
    the hub's current commit of openai-community/<name>, each file checked against the size (and, for the
    weights, the sha256) the hub lists for it."""
    directory = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tritongpt") / name
    files = (HF_CONFIG, HF_SAFETENSORS)
    if all((directory / file).is_file() for file in files):
        return directory  # a file appears there only once verified
    base, repo = hub.endpoint(), f"openai-community/{name}"
    hint = (
        f", or set HF_ENDPOINT (or {hub.ENDPOINT_ENV}) to a mirror of {hub.DEFAULT_ENDPOINT}, or pass a directory "
        f"holding {HF_CONFIG} and {HF_SAFETENSORS} instead of {name!r}"
    )
    commit = hub.resolve_revision(base, "model", repo, hint=hint)
    print(f"downloading {repo} at commit {commit} from {base}")
    listed = {remote.path: remote for remote in hub.list_files(base, "model", repo, commit, hint=hint)}
    for file in files:
        if file not in listed:
            raise DownloadError(f"{repo} at commit {commit} has no {file}{hint}")
        remote = listed[file]
        download(hub.file_url(base, "model", repo, commit, file), directory / file, remote.sha256, remote.size,
                 hint=hint, headers=hub.auth_headers())
    return directory


def gpt2_directory(name_or_dir: str) -> Path:
    if name_or_dir in GPT2_NAMES:
        return gpt2_download(name_or_dir)
    directory = Path(name_or_dir)
    if not directory.is_dir():
        raise ValueError(
            f"{name_or_dir!r} is neither a GPT-2 model name ({', '.join(GPT2_NAMES)}) nor a directory; a local "
            f"directory in Hugging Face GPT-2 format ({HF_CONFIG} + {HF_SAFETENSORS}, as save_pretrained "
            "writes) works too"
        )
    return directory


def gpt_config_from_hf(hf_config: dict, source: Path, dropout: float) -> tuple[dict, str]:
    """Our GPTConfig's fields and the GELU approximation for an HF config.json; an error for anything that
    would make this GPT compute differently from HF's GPT2LMHeadModel."""
    hf = {**HF_GPT2_DEFAULTS, **hf_config}
    problems = []
    if hf.get("model_type") != "gpt2":
        problems.append(f"model_type is {hf.get('model_type')!r}, not 'gpt2'")
    if hf["activation_function"] not in HF_GELU_APPROXIMATE:
        problems.append(f"activation_function is {hf['activation_function']!r}, not one of {list(HF_GELU_APPROXIMATE)}")
    if hf["layer_norm_epsilon"] != 1e-5:
        problems.append(f"layer_norm_epsilon is {hf['layer_norm_epsilon']}, not 1e-5")
    if hf["n_inner"] not in (None, 4 * hf["n_embd"]):
        problems.append(f"n_inner is {hf['n_inner']}, not 4 * n_embd")
    if not hf["scale_attn_weights"] or hf["scale_attn_by_inverse_layer_idx"]:
        problems.append("attention scores are not scaled by 1/sqrt(head size) alone")
    if not hf["tie_word_embeddings"]:
        problems.append("lm_head is not tied to the token embedding")
    if hf["n_embd"] % hf["n_head"]:
        problems.append(f"n_embd {hf['n_embd']} is not divisible by n_head {hf['n_head']}")
    if problems:
        raise ValueError(f"{source} is not a GPT-2 config this model can load: {'; '.join(problems)}")
    config = dict(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                  n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=dropout, bias=True)
    return config, HF_GELU_APPROXIMATE[hf["activation_function"]]


def hf_weight_files(directory: Path) -> list[Path]:
    """The files holding an HF checkpoint's tensors: model.safetensors, its shards, or pytorch_model.bin."""
    if (directory / HF_SAFETENSORS).is_file():
        return [directory / HF_SAFETENSORS]
    if (directory / HF_SAFETENSORS_INDEX).is_file():
        index = directory / HF_SAFETENSORS_INDEX
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a 'weight_map' of tensor "
                             f"names to files): {type(error).__name__}: {error}") from None
        outside = [shard for shard in shards if not isinstance(shard, str)
                   or not (directory / shard).resolve().is_relative_to(directory.resolve())]
        if outside:
            raise ValueError(f"{index} names files outside {directory} ({outside[0]!r}); an index names the "
                             "shards beside it only")
        return [directory / shard for shard in shards]
    if (directory / HF_PYTORCH_BIN).is_file():
        return [directory / HF_PYTORCH_BIN]
    raise FileNotFoundError(f"{directory} has no {HF_SAFETENSORS} (nor {HF_SAFETENSORS_INDEX} or {HF_PYTORCH_BIN})")


def read_hf_shapes(files: list[Path]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, from the safetensors headers (or a memory-mapped pytorch_model.bin):
    nothing is read into memory."""
    for file in files:
        if file.suffix == ".bin":
            for name, tensor in load_file(file, fix="delete it and download it again").items():
                yield name, tuple(tensor.shape)
            continue
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, tuple(f.get_slice(name).get_shape())


def check_hf_layers(n_layer: int, shapes: list[tuple[str, tuple[int, ...]]], source: Path) -> None:
    """config.json's n_layer against the layers the weights hold: before even an empty model of n_layer
    blocks is built."""
    layers = {match[1] for name, _ in shapes if (match := re.match(r"(?:transformer\.)?h\.(\d+)\.", name))}
    if len(layers) != n_layer:
        raise ValueError(f"{source}: {HF_CONFIG} says n_layer={n_layer}, but the weights hold {len(layers)} layers")


def check_hf_shapes(expected: dict[str, tuple[int, ...]], shapes: list[tuple[str, tuple[int, ...]]],
                    source: Path) -> None:
    """Every parameter (name -> shape, as the GPT that config.json describes has them) gets an HF tensor of
    its shape, and no tensor is foreign: checked against the weights' headers before the model is built, so
    a config.json with huge sizes fails here instead of allocating them."""
    missing = set(expected)
    for hf_name, shape in shapes:
        name = our_name(hf_name)
        if name is None:
            continue
        if name not in expected:
            raise ValueError(f"{source} has a tensor {hf_name!r} that GPT-2 does not have")
        conv1d = name.endswith(HF_CONV1D_WEIGHTS)
        if (shape[::-1] if conv1d else shape) != expected[name]:
            raise ValueError(
                f"{source}: {hf_name} has shape {shape}, but {HF_CONFIG} implies "
                f"{expected[name][::-1] if conv1d else expected[name]}{' (Conv1D: (in, out))' if conv1d else ''}"
            )
        missing.discard(name)
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} of the tensors its {HF_CONFIG} implies: "
                         f"{', '.join(sorted(missing)[:5])}")


def read_hf_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, one tensor in memory at a time where the format allows (safetensors)."""
    for file in files:
        if file.suffix == ".bin":
            yield from load_file(file, fix="delete it and download it again").items()
            continue
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def our_name(hf_name: str) -> str | None:
    """Our parameter name for an HF GPT-2 tensor; None for what we do not keep: the tied lm_head and the
    causal-mask buffers (attn.bias, attn.masked_bias) of older checkpoints."""
    name = hf_name.removeprefix("transformer.")  # the hub's files were saved from GPT2Model: no prefix
    if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
        return None
    return f"transformer.{name}"


@torch.no_grad()
def load_hf_tensors(params: dict[str, torch.Tensor], tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy HF GPT-2 tensors, whose names and shapes check_hf_shapes has checked, into the parameters
    (model.named_parameters(): a tied lm_head.weight is listed once, as transformer.wte.weight)."""
    for hf_name, tensor in tensors:
        name = our_name(hf_name)
        if name is not None:
            params[name].copy_(tensor.t() if name.endswith(HF_CONV1D_WEIGHTS) else tensor)


@dataclass
class Pretrained:
    """A GPT-2 in HF's format, checked and ready to load: our GPTConfig's fields, its GELU, its weight files."""

    config: dict
    approximate: str
    files: list[Path]
    source: Path


def find_pretrained(name_or_dir: str, override_args: dict) -> Pretrained:
    """A GPT-2 name (downloaded once) or a local directory, as from_pretrained takes it; override_args may
    change dropout only, as in nanoGPT."""
    unsupported = sorted(set(override_args) - {"dropout"})
    if unsupported:
        raise ValueError(
            f"from_pretrained can only override dropout (the architecture comes from {HF_CONFIG}), got {unsupported}"
        )
    directory = gpt2_directory(name_or_dir)
    config_path = directory / HF_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{directory} has no {HF_CONFIG}; a Hugging Face GPT-2 directory holds {HF_CONFIG} and {HF_SAFETENSORS}"
        )
    config, approximate = gpt_config_from_hf(json.loads(config_path.read_text()), config_path,
                                             override_args.get("dropout", 0.0))
    return Pretrained(config, approximate, hf_weight_files(directory), directory)


def hf_config(cfg, switches_on: dict, approximate: str) -> dict:
    """config.json for a GPTConfig `cfg` (its modern-recipe switches that are on: `switches_on`) whose GELUs
    run with `approximate`."""
    if switches_on:
        raise ValueError(
            f"save_pretrained writes GPT-2's architecture, and this model differs from it: "
            f"{', '.join(f'{k}={v!r}' for k, v in switches_on.items())}. transformers' GPT2LMHeadModel cannot "
            "represent that; save the model with train.py's checkpoints (ckpt.pt) instead"
        )
    eot = GPT2_EOT if cfg.vocab_size > GPT2_EOT else None  # a small vocabulary has no <|endoftext|>
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new" if approximate == "tanh" else "gelu",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "use_cache": True,
    }


def hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model's tensors (its state_dict) under HF GPT-2 names: Linear weights transposed to Conv1D's
    (in, out), zeros for the biases of a bias=False model (HF's GPT-2 always has biases; zero ones change
    nothing), and no lm_head, which HF ties to wte."""
    tensors = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue
        tensors[name] = tensor.t() if name.endswith(HF_CONV1D_WEIGHTS) else tensor
        bias = name.removesuffix("weight") + "bias"
        if name.endswith(HF_BIASED_WEIGHTS) and bias not in state:
            tensors[bias] = tensor.new_zeros(tensor.shape[0])
    return {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}


def save_hf_gpt2(config: dict, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """config.json (hf_config's) and model.safetensors (hf_state_dict's) in `directory`, each written to a
    temporary name first: readers see the old file or the new one, never a torn one."""
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_open(directory / HF_SAFETENSORS) as f:
        f.write(safetensors_bytes(tensors, metadata={"format": "pt"}))
    with atomic_open(directory / HF_CONFIG) as f:
        f.write((json.dumps(config, indent=2) + "\n").encode())
