"""Tests for kernels/common.py: reading TRITON_INTERPRET as Triton does, and the "needs a CUDA GPU" error."""
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
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


@triton.jit
def _tf32_kernel(X, OUT, N, PRECISION: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < N)
    tl.store(OUT + offs, common.tf32_operand(x, PRECISION), mask=offs < N)


def tf32_by_hand(x: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest TF32, ties away from zero, computed in float64 from the definition: keep 10 of the 23
    mantissa bits, i.e. round to a multiple of 2^(exponent - 10)."""
    x64 = x.double()
    exponent = torch.floor(torch.log2(x64.abs()))
    step = torch.exp2(exponent - 10)
    rounded = torch.sign(x64) * torch.floor(x64.abs() / step + 0.5) * step
    return torch.where(x64 == 0, x64, rounded).float()


def test_tf32_operands_are_rounded_to_nearest():
    """What tensor cores would truncate, rounded: 1 + 2^-11 (a tie) goes up, 1 + 2^-11 - 2^-23 down, negatives
    mirror; random values match the definition; other precisions and dtypes pass through."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ties = torch.tensor([1 + 2**-11, 1 + 2**-11 - 2**-23, -(1 + 2**-11), -(1 + 2**-11 - 2**-23), 0.0, -0.0])
    x = torch.cat([ties, torch.randn(250, generator=torch.Generator().manual_seed(0)) * 1e3]).to(device)
    out = torch.empty_like(x)
    _tf32_kernel[(1,)](x, out, x.numel(), PRECISION="tf32", BLOCK=256)
    assert out[:4].tolist() == [1 + 2**-10, 1.0, -(1 + 2**-10), -1.0]
    torch.testing.assert_close(out.cpu(), tf32_by_hand(x.cpu()), rtol=0, atol=0)
    assert ((out - x).abs() <= x.abs() * 2**-11).all()
    _tf32_kernel[(1,)](x, out, x.numel(), PRECISION="ieee", BLOCK=256)
    assert torch.equal(out, x)
