"""Every shipped config file applies cleanly to the script it is written for."""
import ast
import re
import subprocess
import sys

import pytest

from conftest import REPO

CONFIGS = sorted((REPO / "config").glob("*.py"))


def test_there_are_configs():
    names = {c.name for c in CONFIGS}
    assert {"shakespeare.py", "shakespeare_cpu.py", "gpt2_124m.py", "eval_gpt2.py", "finetune_shakespeare.py"} <= names


def help_values(*argv: str) -> dict:
    """The key -> value table that `train.py ... --help` prints."""
    out = subprocess.run([sys.executable, "train.py", *argv, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = (re.match(r"^\s+--(\w+)\s+= (.*)  \((.*)\)$", line) for line in out.stdout.splitlines())
    return {row[1]: ast.literal_eval(row[2]) for row in rows if row}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_config_applies_to_train_py(config):
    values = help_values(str(config))
    again = ({}, {})
    for namespace in again:  # run twice: a value that changes between runs (a timestamped name) is skipped
        exec(config.read_text(), namespace)
    settings = {
        k: v for k, v in again[0].items()
        if not k.startswith("_") and isinstance(v, (int, float, str, bool)) and again[1][k] == v
    }
    assert settings and {k: values[k] for k in settings} == settings


def test_help_shows_values_after_config_and_overrides():
    values = help_values("config/shakespeare.py", "--n_layer=3")
    assert values["n_layer"] == 3 and values["out_dir"] == "out-shakespeare-char" and values["seed"] == 1337
