"""Tests for kernels/common.py: reading TRITON_INTERPRET as Triton does, and the "needs a CUDA GPU" error."""
import os
import subprocess
import sys

import pytest
import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from conftest import REPO
from kernels import common
from kernels import layernorm as ln
from kernels.common import can_run_on, cuda_required_error, env_flag, interpreter_enabled

TRUE_SPELLINGS = ["1", "true", "TRUE", "True", "tRuE", "on", "ON", "On", "yes", "YES", "Yes", "y", "Y"]
# Triton strips no white space, so a padded "1" leaves its interpreter off.
FALSE_SPELLINGS = ["0", "false", "False", "off", "no", "n", "", " ", "2", "t", "enable", " 1", "1 ", " true ",
                   "yes\n"]


@pytest.mark.parametrize("value", TRUE_SPELLINGS)
def test_env_flag_true(value):
    assert env_flag(value)


@pytest.mark.parametrize("value", FALSE_SPELLINGS + [None])
def test_env_flag_false_or_unset(value):
    assert not env_flag(value)


@pytest.mark.parametrize("value", TRUE_SPELLINGS + FALSE_SPELLINGS + [None])
def test_env_flag_agrees_with_triton(value, monkeypatch):
    # Triton reads its knob from the environment on every access; our kernels are already defined, so
    # changing the variable here affects nothing else.
    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    assert env_flag(value) == triton.knobs.runtime.interpret


def test_interpreter_enabled_matches_how_the_kernels_were_built():
    assert interpreter_enabled() == isinstance(ln._sum_partials_kernel, InterpretedFunction)


def test_a_true_spelling_other_than_1_turns_on_the_interpreter_for_triton_and_for_us():
    # flash_attention once took only "1": under "Yes" Triton interpreted its kernels while its input
    # check refused CPU tensors. Both input checks now ask interpreter_enabled().
    code = ("from triton.runtime.interpreter import InterpretedFunction\n"
            "from kernels import layernorm as ln\n"
            "from kernels.common import interpreter_enabled\n"
            "print(interpreter_enabled(), isinstance(ln._sum_partials_kernel, InterpretedFunction))\n")
    env = {**os.environ, "TRITON_INTERPRET": "Yes"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


def test_interpreter_enabled_is_read_at_import(monkeypatch):
    before = interpreter_enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "0" if before else "1")
    assert interpreter_enabled() == before


@pytest.mark.parametrize("interpret", [False, True])
def test_can_run_on(interpret, monkeypatch):
    monkeypatch.setattr(common, "_INTERPRET", interpret)
    assert can_run_on(torch.device("cuda"))
    assert can_run_on(torch.device("cuda", 1))
    assert can_run_on(torch.device("cpu")) == interpret
    assert can_run_on(torch.device("meta")) == interpret


def test_cuda_required_error_names_the_option_the_device_and_both_fixes():
    error = cuda_required_error("attn_impl", "cpu", fallback="sdpa")
    assert isinstance(error, ValueError)
    assert str(error) == ("attn_impl='triton' needs a CUDA GPU, but the tensors are on cpu; use attn_impl='sdpa', "
                          "or set TRITON_INTERPRET=1 before starting Python to run the kernels slowly in Triton's "
                          "interpreter (for testing)")


def test_cuda_required_error_without_fallback_offers_the_interpreter():
    message = str(cuda_required_error("ln_impl", "mps"))
    assert message.startswith("ln_impl='triton' needs a CUDA GPU, but the tensors are on mps; set TRITON_INTERPRET=1 ")
    assert "use " not in message
