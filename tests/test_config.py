"""The config system: nanoGPT's override scheme, with every key and value checked."""
import subprocess
import sys

import pytest

from conftest import REPO
from configurator import ConfigError, config_keys, parse_args

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
