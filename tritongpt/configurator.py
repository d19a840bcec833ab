"""Configuration shared by train.py, sample.py and bench/.

nanoGPT's scheme: a script's config defaults are its module globals; `python train.py config/x.py
--key=value` runs the config file over them, then applies the `--key=value` pairs. Unlike nanoGPT, every
key is checked: an unknown key names the closest valid one, a value of the wrong type names the key and
the type it expects, and a number out of its range (LIMITS) or a name not among its choices names the key
and what it may be. A key's type is its annotation if it has one (`data_dir: str | None = None`), else the
type of its default.

This module also holds what every script does the same way: which device, which dtype, whether to
compile, and how a failure ends the program (one line, no traceback: error_boundary).
"""
import ast
import contextlib
import difflib
import os
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import torch


class UserError(Exception):
    """A failure the user can fix, whose message says how: programs print it as one line (error_boundary)."""


class ConfigError(UserError, ValueError):
    """A config file or command-line override that cannot be applied."""


def config_keys(namespace: dict) -> dict[str, object]:
    """The keys a script exposes: its public globals holding plain values (str, int, float, bool, None)."""
    return {
        name: value
        for name, value in namespace.items()
        if not name.startswith("_") and (value is None or type(value) in (str, int, float, bool))
    }


def allowed_types(key: str, default: object, annotations: dict) -> tuple[type, ...]:
    annotation = annotations.get(key)
    if annotation is None:
        return (type(default),)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # `str | None`, `Optional[str]`
        return tuple(type(None) if arg is type(None) else arg for arg in typing.get_args(annotation))
    return (annotation,)


def type_name(allowed: tuple[type, ...]) -> str:
    return " or ".join("None" if t is type(None) else t.__name__ for t in allowed)


def coerce(key: str, value: object, allowed: tuple[type, ...]) -> object:
    """Check `value` against the key's types; an int where a float is expected becomes a float."""
    if type(value) in allowed:
        return value
    if float in allowed and type(value) is int:
        return float(value)
    raise ConfigError(f"{key} expects {type_name(allowed)}, got {value!r} ({type(value).__name__})")


@dataclass(frozen=True)
class Limit:
    """The numbers a key may hold: low <= value (low < value if low_open), value <= high (< if high_open)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    meaning: str = ""  # what the edge means, for the message: "0 turns it off"

    def admits(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts) + (f" ({self.meaning})" if self.meaning else "")


COUNT = Limit(low=1)
NON_NEGATIVE = Limit(low=0)
FRACTION = Limit(low=0, high=1, high_open=True)
# Every numeric key of train.py and sample.py that has a range; a script is checked on the keys it has.
# (The model's own invariants, such as n_embd divisible by n_head, are GPTConfig's to check, and the
# sampling settings generate.check_sampling's.)
LIMITS = {
    "eval_interval": COUNT, "log_interval": COUNT, "eval_iters": COUNT, "batch_size": COUNT, "block_size": COUNT,
    "gradient_accumulation_steps": COUNT, "n_layer": COUNT, "n_head": COUNT, "n_embd": COUNT,
    "tensor_parallel": COUNT, "pipeline_parallel": COUNT, "pipeline_stages_per_rank": COUNT, "num_samples": COUNT,
    "max_iters": NON_NEGATIVE, "warmup_iters": NON_NEGATIVE, "lr_decay_iters": NON_NEGATIVE,
    "early_stopping_patience": Limit(low=0, meaning="0 never stops early"),
    "grad_clip": Limit(low=0, meaning="0 turns clipping off"), "learning_rate": NON_NEGATIVE, "min_lr": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE, "muon_lr": NON_NEGATIVE, "beta1": FRACTION, "beta2": FRACTION,
    "muon_momentum": FRACTION, "dropout": FRACTION, "torch_threads": Limit(low=0, meaning="0 keeps torch's default"),
}
# Keys whose value is one of a few names (the model's switches are GPTConfig's to check).
CHOICES = {
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "parallel": ("ddp", "fsdp"),
    "optimizer": ("adamw", "muon"),
    "attn_impl": ("auto", "eager", "sdpa", "triton", "flex"),
    "ln_impl": ("auto", "torch", "triton"),
    "ce_impl": ("auto", "torch", "triton"),
    "pipeline_schedule": ("1f1b", "gpipe", "interleaved_1f1b"),
}
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_values(config: dict) -> None:
    """Each key's value against its range or choices (LIMITS, CHOICES) and the device's form; ConfigError names
    the key, the value and what it may be."""
    for key, value in config.items():
        limit = LIMITS.get(key)
        if limit is not None and type(value) in (int, float) and not limit.admits(value):
            raise ConfigError(f"{key} must be {limit.describe()}, got {value!r}")
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, CHOICES[key]))}, got {value!r}")
    device = config.get("device")
    if isinstance(device, str) and not DEVICE_PATTERN.fullmatch(device):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' (a GPU's index) or 'mps', got {device!r}")


def parse_value(key: str, text: str, allowed: tuple[type, ...]) -> object:
    """Turn the text of `--key=text` into a value of the key's type."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word such as --device=cuda:1
    if type(value) is str and str not in allowed:
        raise ConfigError(f"--{key}={text}: {key} expects {type_name(allowed)}, and {text!r} is not one")
    if str in allowed and type(value) not in allowed:
        value = text  # e.g. --wandb_run_name=2024 stays the string '2024'
    return coerce(key, value, allowed)


def unknown_key_error(key: str, known: typing.Iterable[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; run with --help to list the valid keys"
    return ConfigError(f"unknown config key '{key}' {where}{hint}")


def help_text(script: str, defaults: dict, annotations: dict) -> str:
    width = max(len(k) for k in defaults)
    lines = [
        f"usage: python {script} [config/file.py ...] [--key=value ...]",
        "",
        "Config files are Python files that assign keys; --key=value overrides them. Keys and values",
        "(the defaults, after any config files and overrides given before --help):",
    ]
    for key, default in defaults.items():
        kind = type_name(allowed_types(key, default, annotations))
        lines.append(f"  --{key:<{width}} = {default!r}  ({kind})")
    return "\n".join(lines)


def apply_config_file(path: str, config: dict, annotations: dict) -> list[str]:
    """Run a config file over `config`; returns the keys it set."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path} not found (config files live in config/, e.g. config/shakespeare.py)")
    namespace: dict = {}
    exec(compile(file.read_text(), str(file), "exec"), namespace)
    keys = []
    for key, value in namespace.items():
        if key.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
            continue
        if key not in config:
            raise unknown_key_error(key, config, f"in {path}")
        config[key] = coerce(key, value, allowed_types(key, config[key], annotations))
        keys.append(key)
    return keys


def parse_args(argv: list[str], defaults: dict, annotations: dict, given: set[str] | None = None) -> dict:
    """The config after applying config files and --key=value overrides in order, its values checked
    (check_values). Raises ConfigError. `given`, when passed, receives the keys a file or flag set."""
    config = dict(defaults)
    given = set() if given is None else given
    for arg in argv:
        if not arg.startswith("--"):
            given.update(apply_config_file(arg, config, annotations))
            continue
        key, sep, text = arg[2:].partition("=")
        if not sep:
            raise ConfigError(f"'{arg}' is not of the form --key=value (e.g. --batch_size=32)")
        if key not in defaults:
            raise unknown_key_error(key, defaults, "on the command line")
        config[key] = parse_value(key, text, allowed_types(key, defaults[key], annotations))
        given.add(key)
    check_values(config)
    return config


def script_defaults(script: str | Path) -> tuple[dict, dict]:
    """A script's config defaults and their annotations, read from its source without running it: the
    top-level assignments of plain values before `configure(globals())`. bench/ reads train.py's this way,
    so the defaults live in one place."""
    tree = ast.parse(Path(script).read_text())
    defaults, annotations = {}, {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target = node.targets[0]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            target = node.target
            annotations[target.id] = eval(ast.unparse(node.annotation), {})  # `str | None`: builtins only
        else:
            continue
        if target.id == "config":  # config = configure(globals()): the defaults end here
            break
        try:  # our own source: plain values and arithmetic such as `5 * 8`, nothing that needs a name
            defaults[target.id] = eval(ast.unparse(node.value), {"__builtins__": {}})
        except NameError:
            continue  # not a plain value, so not a config key
    return config_keys(defaults), annotations


def script_config(script: str | Path, argv: list[str]) -> dict:
    """A script's config after config files and --key=value overrides (argv), without running the script."""
    defaults, annotations = script_defaults(script)
    return parse_args(argv, defaults, annotations)


def configure(namespace: dict, argv: list[str] | None = None, given: set[str] | None = None) -> dict:
    """Apply sys.argv to a script's globals in place and return the resulting config dict; `given`, when
    passed, receives the keys that a config file or flag set (train.py refuses some of them on resume).

    Prints usage for --help and exits with a one-line message (no traceback) on a bad key or value.
    """
    argv = sys.argv[1:] if argv is None else argv
    defaults = config_keys(namespace)
    annotations = namespace.get("__annotations__", {})
    help_flags = [arg for arg in argv if arg in ("--help", "-h")]
    try:
        config = parse_args([arg for arg in argv if arg not in help_flags], defaults, annotations, given)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    if help_flags:  # after the other arguments, so `train.py config/x.py --help` shows that config's values
        print(help_text(Path(sys.argv[0]).name, config, annotations))
        sys.exit(0)
    for arg in argv:
        if not arg.startswith("--"):
            print(f"Overriding config with {arg}")
    namespace.update(config)
    return config


# -----------------------------------------------------------------------------
# Run-time choices: device, dtype, compile


def resolve_device(device: str) -> str:
    """'auto' is the best device present: cuda, then mps, then cpu. A device this machine lacks is a
    ConfigError that says what there is."""
    if not DEVICE_PATTERN.fullmatch(device):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' (a GPU's index) or 'mps', got {device!r}")
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
            raise ConfigError(f"device={device!r}, but PyTorch sees no CUDA GPU here (torch {torch.__version__}, "
                              f"{build}); use --device=cpu, or --device=auto to take what there is")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device={device!r}, but there are {torch.cuda.device_count()} CUDA GPU(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps', but this machine or PyTorch build has no MPS (Apple GPU) support; use "
                          "--device=cpu or --device=auto")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' is bfloat16 where the GPU supports it, else float16 (with a GradScaler) on CUDA, else float32."""
    if dtype not in CHOICES["dtype"]:
        raise ConfigError(f"dtype must be one of {', '.join(map(repr, CHOICES['dtype']))}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def resolve_compile(compile: bool | str, device: str) -> bool:
    """'auto' compiles on CUDA only: elsewhere compile time rarely pays for itself in a short run."""
    if compile == "auto":
        return device.startswith("cuda")
    if not isinstance(compile, bool):
        raise ConfigError(f"compile must be True, False or 'auto', got {compile!r}")
    return compile


def autocast(device: str, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; a no-op in float32."""
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


# -----------------------------------------------------------------------------
# How a program ends on a failure

DEBUG_ENV = "TRITONGPT_DEBUG"  # set to 1 to see the traceback of a failure


def error_boundary() -> None:
    """Make every uncaught exception end the program with one line, `error: <message>`, and exit status 1,
    instead of a traceback (unless TRITONGPT_DEBUG=1). Our own errors (ConfigError, CheckpointError, ...)
    already say what to do; for anything else the line also names the exception's type and how to see
    the traceback, which a bug report needs."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return

    def one_line(kind, value, traceback) -> None:
        if not issubclass(kind, Exception):  # KeyboardInterrupt, SystemExit: Python's own handling
            sys.__excepthook__(kind, value, traceback)
            return
        message = str(value).strip() or kind.__name__
        if not issubclass(kind, (UserError, ValueError, FileNotFoundError)):  # ours say the fix: those may not
            message = f"{kind.__name__}: {message} (run again with {DEBUG_ENV}=1 to see where)"
        print(f"error: {message}", file=sys.stderr)

    sys.excepthook = one_line
