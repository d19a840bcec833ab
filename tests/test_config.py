"""The config system: nanoGPT's override scheme, with every key and value checked."""
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from tritongpt.configurator import ConfigError, config_keys, parse_args, resolve_device, script_defaults

DEFAULTS = {"batch_size": 12, "learning_rate": 6e-4, "compile": "auto", "data_dir": None, "dataset": "owt", "bias": False}
ANNOTATIONS = {"compile": bool | str, "data_dir": str | None}


def parse(*argv):
    return parse_args(list(argv), DEFAULTS, ANNOTATIONS)


def test_overrides_apply_in_order_and_keep_types():
    config = parse("--batch_size=32", "--batch_size=64", "--learning_rate=1e-3", "--bias=True", "--dataset=shakespeare_char")
    assert config == {**DEFAULTS, "batch_size": 64, "learning_rate": 1e-3, "bias": True, "dataset": "shakespeare_char"}


def test_int_for_float_key_becomes_float():
    config = parse("--learning_rate=1")
    assert config["learning_rate"] == 1.0 and type(config["learning_rate"]) is float


def test_none_for_optional_key_and_union_types():
    assert parse("--data_dir=None")["data_dir"] is None
    assert parse("--data_dir=/tmp/x")["data_dir"] == "/tmp/x"
    assert parse("--compile=False")["compile"] is False
    assert parse("--compile=auto")["compile"] == "auto"


def test_string_key_keeps_numeric_looking_text():
    assert parse("--dataset=2024")["dataset"] == "2024"


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match="unknown config key 'batchsize'.*did you mean 'batch_size'"):
        parse("--batchsize=3")


def test_malformed_value_names_key_and_type():
    with pytest.raises(ConfigError, match="batch_size expects int"):
        parse("--batch_size=3.5")
    with pytest.raises(ConfigError, match="bias expects bool"):
        parse("--bias=yes")
    with pytest.raises(ConfigError, match="learning_rate expects float"):
        parse("--learning_rate=fast")
    with pytest.raises(ConfigError, match="not of the form --key=value"):
        parse("--bias")


def test_config_file(tmp_path):
    good = tmp_path / "good.py"
    good.write_text("import math\nbatch_size = 2 ** 5\nlearning_rate = 3\n")
    config = parse(str(good), "--batch_size=7")
    assert config["batch_size"] == 7 and config["learning_rate"] == 3.0
    typo = tmp_path / "typo.py"
    typo.write_text("learning_rat = 1e-3\n")
    with pytest.raises(ConfigError, match=f"'learning_rat' in {typo}.*did you mean 'learning_rate'"):
        parse(str(typo))
    wrong = tmp_path / "wrong.py"
    wrong.write_text("batch_size = 'big'\n")
    with pytest.raises(ConfigError, match="batch_size expects int"):
        parse(str(wrong))
    with pytest.raises(ConfigError, match="not found"):
        parse(str(tmp_path / "missing.py"))


def test_config_keys_are_plain_public_values():
    namespace = {"a": 1, "_private": 2, "module": sys, "f": print, "b": None, "c": "x"}
    assert config_keys(namespace) == {"a": 1, "b": None, "c": "x"}


@pytest.mark.parametrize("script", ["train.py", "sample.py"])
def test_help_lists_every_key_with_default(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--max_new_tokens" in out.stdout if script == "sample.py" else "--gradient_accumulation_steps" in out.stdout
    assert "--device" in out.stdout and "'auto'" in out.stdout


def test_cli_error_is_one_clear_line():
    out = subprocess.run([sys.executable, "train.py", "--n_layers=2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "did you mean 'n_layer'" in out.stderr and "Traceback" not in out.stderr


TRAIN_DEFAULTS, TRAIN_ANNOTATIONS = script_defaults(REPO / "train.py")


@pytest.mark.parametrize("flag, message", [
    ("--grad_clip=-1", "grad_clip must be >= 0 (0 turns clipping off), got -1.0"),
    ("--gradient_accumulation_steps=0", "gradient_accumulation_steps must be >= 1, got 0"),
    ("--gradient_accumulation_steps=-2", "gradient_accumulation_steps must be >= 1, got -2"),
    ("--eval_interval=0", "eval_interval must be >= 1, got 0"),
    ("--log_interval=0", "log_interval must be >= 1, got 0"),
    ("--eval_iters=0", "eval_iters must be >= 1, got 0"),
    ("--eval_iters=-1", "eval_iters must be >= 1, got -1"),
    ("--batch_size=0", "batch_size must be >= 1, got 0"),
    ("--block_size=0", "block_size must be >= 1, got 0"),
    ("--max_iters=-5", "max_iters must be >= 0, got -5"),
    ("--dropout=1.0", "dropout must be >= 0 and < 1, got 1.0"),
    ("--beta2=1.5", "beta2 must be >= 0 and < 1, got 1.5"),
    ("--learning_rate=-1e-3", "learning_rate must be >= 0, got -0.001"),
    ("--early_stopping_patience=-1", "early_stopping_patience must be >= 0 (0 never stops early), got -1"),
    ("--tensor_parallel=0", "tensor_parallel must be >= 1, got 0"),
    ("--dtype=float64", "dtype must be one of 'auto', 'float32', 'bfloat16', 'float16', got 'float64'"),
    ("--parallel=zero", "parallel must be one of 'ddp', 'fsdp', got 'zero'"),
    ("--optimizer=sgd", "optimizer must be one of 'adamw', 'muon', got 'sgd'"),
    ("--device=foo", "device must be 'auto', 'cpu', 'cuda', 'cuda:N' (a GPU's index) or 'mps', got 'foo'"),
    ("--device=cuda:x", "device must be 'auto', 'cpu', 'cuda', 'cuda:N'"),
])
def test_values_out_of_range_name_the_key_and_what_it_may_be(flag, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args([flag], TRAIN_DEFAULTS, TRAIN_ANNOTATIONS)


def test_edges_of_the_ranges_are_accepted(tmp_path):
    edges = ["--grad_clip=0", "--gradient_accumulation_steps=1", "--eval_iters=1", "--max_iters=0", "--dropout=0",
             "--beta2=0.999", "--early_stopping_patience=0", "--device=cuda:1", "--device=mps", "--dtype=float16"]
    config = parse_args(edges, TRAIN_DEFAULTS, TRAIN_ANNOTATIONS)
    assert config["grad_clip"] == 0.0 and config["max_iters"] == 0 and config["device"] == "mps"
    bad_file = tmp_path / "bad.py"
    bad_file.write_text("eval_interval = 0\n")  # a config file is checked the same way
    with pytest.raises(ConfigError, match="eval_interval must be >= 1"):
        parse_args([str(bad_file)], TRAIN_DEFAULTS, TRAIN_ANNOTATIONS)


def test_the_keys_given_are_reported(tmp_path):
    file = tmp_path / "c.py"
    file.write_text("n_layer = 4\nbatch_size = 8\n")
    given = set()
    parse_args([str(file), "--dropout=0.1"], TRAIN_DEFAULTS, TRAIN_ANNOTATIONS, given)
    assert given == {"n_layer", "batch_size", "dropout"}


def test_a_device_this_machine_lacks_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    with pytest.raises(ConfigError, match=r"device='cuda', but PyTorch sees no CUDA GPU here .*--device=cpu"):
        resolve_device("cuda")
    assert resolve_device("cpu") == "cpu" and resolve_device("auto") in ("cpu", "mps")


def test_a_device_index_past_the_gpus_says_how_many_there_are(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"device='cuda:2', but there are 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == "cuda:1"


def test_errors_end_the_program_in_one_line_unless_debugging(tmp_path):
    """error_boundary: ours print their message; others their type too, with how to see the traceback."""
    script = tmp_path / "fails.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\nfrom tritongpt.configurator import ConfigError, "
                      "error_boundary\nerror_boundary()\nraise (ConfigError('x must be 1') if sys.argv[1] == 'ours' "
                      "else KeyError('k'))\n")
    env = {key: value for key, value in os.environ.items() if key != "TRITONGPT_DEBUG"}
    ours = subprocess.run([sys.executable, str(script), "ours"], capture_output=True, text=True, env=env, timeout=60)
    assert ours.returncode == 1 and ours.stderr == "error: x must be 1\n"
    other = subprocess.run([sys.executable, str(script), "other"], capture_output=True, text=True, env=env, timeout=60)
    assert other.returncode == 1 and other.stderr == "error: KeyError: 'k' (run again with TRITONGPT_DEBUG=1 to see where)\n"
    debug = subprocess.run([sys.executable, str(script), "other"], capture_output=True, text=True, timeout=60,
                           env={**env, "TRITONGPT_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "KeyError: 'k'" in debug.stderr
