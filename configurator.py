"""Configuration shared by train.py, sample.py and bench/.

nanoGPT's scheme: a script's config defaults are its module globals; `python train.py config/x.py
--key=value` runs the config file over them, then applies the `--key=value` pairs. Unlike nanoGPT, every
key is checked: an unknown key names the closest valid one, and a value of the wrong type names the key
and the type it expects. A key's type is its annotation if it has one (`data_dir: str | None = None`),
else the type of its default.

This module also holds the run-time choices every script makes the same way: which device, which dtype,
whether to compile.
"""
import ast
import contextlib
import difflib
import sys
import types
import typing
from pathlib import Path

import torch


class ConfigError(ValueError):
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


def apply_config_file(path: str, config: dict, annotations: dict) -> None:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path} not found (config files live in config/, e.g. config/shakespeare.py)")
    namespace: dict = {}
    exec(compile(file.read_text(), str(file), "exec"), namespace)
    for key, value in namespace.items():
        if key.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
            continue
        if key not in config:
            raise unknown_key_error(key, config, f"in {path}")
        config[key] = coerce(key, value, allowed_types(key, config[key], annotations))


def parse_args(argv: list[str], defaults: dict, annotations: dict) -> dict:
    """The config after applying config files and --key=value overrides in order. Raises ConfigError."""
    config = dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            apply_config_file(arg, config, annotations)
            continue
        key, sep, text = arg[2:].partition("=")
        if not sep:
            raise ConfigError(f"'{arg}' is not of the form --key=value (e.g. --batch_size=32)")
        if key not in defaults:
            raise unknown_key_error(key, defaults, "on the command line")
        config[key] = parse_value(key, text, allowed_types(key, defaults[key], annotations))
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


def configure(namespace: dict, argv: list[str] | None = None) -> dict:
    """Apply sys.argv to a script's globals in place and return the resulting config dict.

    Prints usage for --help and exits with a one-line message (no traceback) on a bad key or value.
    """
    argv = sys.argv[1:] if argv is None else argv
    defaults = config_keys(namespace)
    annotations = namespace.get("__annotations__", {})
    help_flags = [arg for arg in argv if arg in ("--help", "-h")]
    try:
        config = parse_args([arg for arg in argv if arg not in help_flags], defaults, annotations)
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
    """'auto' is the best device present: cuda, then mps, then cpu."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' is bfloat16 where the GPU supports it, else float16 (with a GradScaler) on CUDA, else float32."""
    valid = ("auto", "float32", "bfloat16", "float16")
    if dtype not in valid:
        raise ConfigError(f"dtype must be one of {valid}, got {dtype!r}")
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
