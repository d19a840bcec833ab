"""What the kernels share: whether Triton runs them in its interpreter, the error for a device they cannot
run on, and rounding to a low-precision dtype as a GPU rounds. Imports nothing from the rest of the
project, so kernels/ stays usable on its own."""
import os

import torch
import triton
import triton.language as tl

# The values Triton's getenv_bool (behind triton.knobs.env_bool) takes as true, compared ignoring case.
# Triton strips no white space, so neither does env_flag: " 1" leaves the interpreter off.
_TRUE_VALUES = frozenset({"1", "y", "yes", "on", "true"})


def env_flag(value: str | None) -> bool:
    """Whether Triton reads this value of a boolean environment variable (None: unset) as true."""
    return value is not None and value.lower() in _TRUE_VALUES


# Read once, at import. `triton.jit` picks the interpreter or the compiler for each kernel when the
# kernel is defined, which is when kernels/ is imported, right after this module; a TRITON_INTERPRET
# set later changes nothing for our kernels, so it must not change what this module reports either.
_INTERPRET = env_flag(os.environ.get("TRITON_INTERPRET"))


def interpreter_enabled() -> bool:
    """Whether our kernels run in Triton's interpreter (TRITON_INTERPRET was on when they were imported)."""
    return _INTERPRET


def can_run_on(device: torch.device) -> bool:
    """Whether the kernels can take tensors on `device`: CUDA, or any device under the interpreter."""
    return torch.device(device).type == "cuda" or interpreter_enabled()


def cuda_required_error(what: str, device_type: str, fallback: str | None = None) -> ValueError:
    """The error for Triton kernels given tensors on a device they cannot run on, for the caller to raise.

    what: the option that chose the kernels, e.g. 'attn_impl'. device_type: the tensors' device type,
    e.g. 'cpu'. fallback: the value of that option that runs without a GPU, e.g. 'sdpa', if there is one.
    """
    fix = f"use {what}='{fallback}', or set" if fallback else "set"
    return ValueError(f"{what}='triton' needs a CUDA GPU, but the tensors are on {device_type}; {fix} "
                      "TRITON_INTERPRET=1 before starting Python to run the kernels slowly in Triton's "
                      "interpreter (for testing)")


@triton.jit
def round_to(x, like_ptr, UPCAST: tl.constexpr):
    """fp32 x rounded to the dtype of like_ptr's tensor, to nearest as a GPU rounds. Under the interpreter
    (UPCAST) the result stays fp32, as its dots need, holding the rounded value: the tests then see the
    GPU's precision. The interpreter's own cast to bfloat16 truncates, so it is rounded by hand there."""
    dtype = like_ptr.dtype.element_ty
    if not UPCAST:
        rounded = x.to(dtype)
    elif dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # to nearest, ties to even
        rounded = bits.to(tl.float32, bitcast=True)
    else:
        rounded = x.to(dtype).to(tl.float32)
    return rounded


@triton.jit
def tf32_operand(x, PRECISION: tl.constexpr):
    """x as an operand of a dot in PRECISION: for TF32 dots of fp32 values, rounded to the nearest TF32
    (10 mantissa bits, ties away from zero, as cvt.rna.tf32.f32 rounds). Tensor cores read only an fp32
    operand's top 19 bits: a truncation that pulls every product toward zero, where PyTorch's TF32 matmuls
    (cuBLAS) round to nearest. Other precisions and dtypes pass through unchanged."""
    if PRECISION == "tf32" and x.dtype == tl.float32:
        bits = x.to(tl.uint32, bitcast=True)
        x = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return x
