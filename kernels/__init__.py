"""Our Triton kernels, each with its autograd wrapper and a PyTorch reference for the tests."""
from kernels.common import can_run_on, cuda_required_error, interpreter_enabled
from kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from kernels.flash_attention import flash_attention, flash_attention_supported
from kernels.layernorm import layer_norm, layer_norm_supported, rms_norm, rms_norm_reference

__all__ = ["can_run_on", "cuda_required_error", "flash_attention", "flash_attention_supported",
           "interpreter_enabled", "layer_norm", "layer_norm_supported", "linear_cross_entropy",
           "linear_cross_entropy_reference", "rms_norm", "rms_norm_reference"]
