"""Tests for kernels/tuning.py: the autotuning spaces, and that each kernel's launch keeps exactly its own space.

The timing itself needs a GPU (tests marked `gpu`); here: the spaces' invariants, the pruning that picks a
space out of a kernel's configurations, the interpreter's single configuration, and the cross-entropy kernel
at every vocabulary tile of its space against PyTorch.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICE

from kernels import common, tuning
from kernels.cross_entropy import loss_and_logit_grads

flash_module = importlib.import_module("kernels.flash_attention")
norm_module = importlib.import_module("kernels.layernorm")
ce_module = importlib.import_module("kernels.cross_entropy")

SPACE_ARGS = [(block_d, dtype, dropout, arch, tf32)
              for block_d in (16, 32, 64, 128) for dtype in (torch.float16, torch.bfloat16, torch.float32)
              for dropout in (False, True) for arch in (80, 86, 89, 90)
              for tf32 in ((False, True) if dtype == torch.float32 else (False,))]


def test_attention_spaces_are_small_and_causal_safe():
    """2-4 tilings per space; held a multiple of streamed (the causal band is whole streamed tiles); warps a
    power of two; the 128-row held tiles are in the fp16/bf16 spaces."""
    held_128 = set()
    for kernel in tuning.ATTENTION_KERNELS:
        for args in SPACE_ARGS:
            space = tuning.attention_space(kernel, *args)
            assert 1 <= len(space) <= 4 and len(set(space)) == len(space)
            for tiles in space:
                assert tiles.held % tiles.streamed == 0 and tiles.streamed >= 16
                assert tiles.warps in (4, 8) and tiles.stages >= 1
                if tiles.held == 128:
                    held_128.add((kernel, args[1]))
    assert {("forward", torch.bfloat16), ("backward", torch.bfloat16), ("deterministic", torch.float16)} <= held_128


@pytest.mark.parametrize("kernel,prune,held,streamed", [
    ("forward", "_prune_forward", "BLOCK_M", "BLOCK_N"),
    ("backward", "_prune_dkdv", "BLOCK_N", "BLOCK_M"),
    ("deterministic", "_prune_dkdv", "BLOCK_N", "BLOCK_M"),
    ("deterministic", "_prune_dq", "BLOCK_M", "BLOCK_N"),
])
def test_each_launch_keeps_exactly_its_space(kernel, prune, held, streamed, monkeypatch):
    """Out of all the configurations a kernel is decorated with on a GPU, early_config_prune keeps the space of
    the launch's head dim, dtype, dropout, matmul precision, design and GPU: no more, no fewer."""
    monkeypatch.setattr(tuning, "interpreter_enabled", lambda: False)
    kernels = ("backward", "deterministic") if prune == "_prune_dkdv" else (kernel,)
    configs = tuning.attention_configs(kernels, held, streamed)
    for block_d, dtype, dropout, arch, tf32 in SPACE_ARGS:
        monkeypatch.setattr(flash_module, "target_arch", lambda: arch)
        kept = getattr(flash_module, prune)(configs, {"Q": torch.empty(0, dtype=dtype)}, BLOCK_D=block_d,
                                            DROPOUT=dropout, PRECISION="tf32" if tf32 else "ieee",
                                            ATOMIC_DQ=kernel == "backward")
        expected = tuning.attention_space(kernel, block_d, dtype, dropout, arch, tf32)
        kept_tiles = [tuning.config_tiles(c, held, streamed) for c in kept]
        assert len(kept_tiles) == len(expected) and set(kept_tiles) == set(expected)


@pytest.mark.skipif(not common.interpreter_enabled(), reason="the interpreter's configuration")
def test_the_interpreter_runs_one_small_configuration():
    """Nothing is timed in the interpreter: every autotuned kernel has one configuration, so it never benchmarks."""
    tuned = [flash_module._fwd_kernel, flash_module._bwd_dkdv_kernel, flash_module._bwd_dq_kernel,
             norm_module._fwd_kernel, norm_module._fwd_chunked_kernel, norm_module._bwd_kernel,
             norm_module._bwd_row_means_kernel, norm_module._bwd_chunked_kernel, ce_module._ce_kernel]
    for kernel in tuned:
        assert len(kernel.configs) == 1, kernel.fn.__name__
    assert flash_module._fwd_kernel.configs[0].kwargs == {"BLOCK_M": 32, "BLOCK_N": 16}


def test_sequence_bucket_groups_lengths():
    assert [tuning.sequence_bucket(t) for t in (1, 128, 129, 1000, 1024, 1025, 10**6)] == \
        [128, 128, 256, 1024, 1024, 2048, 16384]


def test_norm_warps_follow_the_width():
    assert tuning.norm_warps(1024) == (2, 4, 8)  # 4, 8 or 16 elements per thread
    assert tuning.norm_warps(32) == (1,)
    assert tuning.norm_warps(16384) == (16,)
    kept = tuning.prune_norm_configs([c for c in _gpu(tuning.norm_configs)], {}, BLOCK_N=4096)
    assert sorted(c.num_warps for c in kept) == [8, 16]


def test_cross_entropy_space_fits_the_vocabulary():
    assert tuning.cross_entropy_space(5) == ((1024, 4),)
    assert tuning.cross_entropy_space(3000) == ((1024, 4), (2048, 4), (4096, 4), (4096, 8))
    assert (8192, 8) in tuning.cross_entropy_space(50304)
    kept = tuning.prune_cross_entropy_configs(_gpu(tuning.cross_entropy_configs), {"n_cols": 1500})
    assert sorted((c.kwargs["BLOCK"], c.num_warps) for c in kept) == [(1024, 4), (2048, 4)]


def _gpu(make_configs):
    """The configurations a GPU gets, built with the interpreter switched off for the call."""
    original = tuning.interpreter_enabled
    tuning.interpreter_enabled = lambda: False
    try:
        return make_configs()
    finally:
        tuning.interpreter_enabled = original


@pytest.mark.parametrize("block,warps", tuning.CROSS_ENTROPY_SPACE)
def test_cross_entropy_kernel_at_every_tile_of_its_space(block, warps):
    """Loss and logit gradients as F.cross_entropy's for a vocabulary that no tile divides (3001), and one the
    tile is wider than (the 8192 tiles), with an ignored row."""
    gen = torch.Generator().manual_seed(block)
    logits = torch.randn(3, 3001, generator=gen, dtype=torch.float64).float().to(KERNEL_DEVICE)
    targets = torch.tensor([5, -1, 3000], device=KERNEL_DEVICE)
    reference = logits.detach().double().requires_grad_()
    expected = F.cross_entropy(reference, targets, ignore_index=-1)
    expected.backward()
    losses = torch.empty(3, device=KERNEL_DEVICE)
    grads = logits.clone()
    loss_and_logit_grads(grads, targets, losses, torch.tensor([0.5], device=KERNEL_DEVICE), 0.0, -1, (block, warps))
    torch.testing.assert_close(losses.sum().double() * 0.5, expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads.double(), reference.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_autotuning_tunes_once_per_key_and_keeps_its_space():
    """On a GPU: the first call with a new key times the space, a length in the same bucket reuses the choice,
    and the choice is one of the launch's space."""
    from kernels.flash_attention import flash_attention

    kernel = flash_module._fwd_kernel
    kernel.cache.clear()
    for T in (1000, 900):  # one bucket (1024)
        q = torch.randn(2, 4, T, 64, device="cuda", dtype=torch.bfloat16)
        flash_attention(q, q, q, causal=True)
    assert len(kernel.cache) == 1
    q = torch.randn(2, 4, 3000, 64, device="cuda", dtype=torch.bfloat16)
    flash_attention(q, q, q, causal=True)
    assert len(kernel.cache) == 2
    space = tuning.attention_space("forward", 64, torch.bfloat16, False, tuning.target_arch(), False)
    assert all(tuning.config_tiles(c, "BLOCK_M", "BLOCK_N") in space for c in kernel.cache.values())


@pytest.mark.gpu
def test_gpu_backward_designs_agree_and_deterministic_repeats():
    from kernels.flash_attention import flash_attention

    q, k, v, do = (torch.randn(2, 6, 2048, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    grads = {}
    for deterministic in (False, True, True):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        flash_attention(*leaves, causal=True, deterministic=deterministic).backward(do)
        grads.setdefault(deterministic, []).append([x.grad for x in leaves])
    first, second = grads[True]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    for a, b in zip(grads[False][0], first):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
