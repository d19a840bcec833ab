"""Our Triton kernels, each with its autograd wrapper and a PyTorch reference for the tests."""
from kernels.flash_attention import flash_attention, flash_attention_supported
from kernels.layernorm import layer_norm, layer_norm_supported

__all__ = ["flash_attention", "flash_attention_supported", "layer_norm", "layer_norm_supported"]
