"""The autotuning spaces of every kernel: which tile sizes, warps and stages `triton.autotune` may try.

Nobody on this project has timed these kernels on a GPU, so each launch measures a few configurations
on the first call with a new key (head dim, dtype, causal, dropout and a sequence-length bucket for
attention; the width and dtype for the norms; the vocabulary size for cross-entropy) and keeps the
fastest for the rest of the process. Each space is small (1-4 configurations) and holds only what
compiles for sm_80, sm_89 and sm_90 within shared memory and without spilling more than a few bytes:
bench/compile_kernels.py compiles every configuration of every space (`attention_space_cases` lists
them) and its committed report shows the result. The interpreter, which times nothing, gets one small
configuration. Under torch.compile, Inductor benchmarks the same configurations once when it compiles.

Attention tiles are written as `Tiles(held, streamed, warps, stages)`: a program holds `held` rows (queries
in the forward and the deterministic dQ kernel, keys in the backward's dK/dV kernel) and streams the other
side past them. `held` is a multiple of `streamed`, so the causal diagonal band is a whole number of
streamed tiles.
"""
from dataclasses import dataclass

import torch
import triton

from kernels.common import interpreter_enabled

ATTENTION_KERNELS = ("forward", "backward", "deterministic")
_ARCHS = (80, 86, 89, 90)
_BLOCK_DS = (16, 32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Tiles:
    held: int
    streamed: int
    warps: int
    stages: int


# Small tiles keep the interpreter fast and make T = tile +- 1 cheap to test.
INTERPRETER_TILES = Tiles(32, 16, 4, 1)


def attention_space(kernel: str, block_d: int, dtype: torch.dtype, dropout: bool, arch: int,
                    allow_tf32: bool) -> tuple[Tiles, ...]:
    """The tilings autotuning tries for one attention kernel ('forward'; 'backward', the one-pass dK/dV
    kernel with atomic dQ; 'deterministic', the dK/dV and dQ kernels that own their outputs) on a GPU of
    compute capability `arch`.

    fp16/bf16 take FlashAttention-2's sizes. Before Hopper a 128x64 forward tile of 4 warps fills all 255
    registers and spills, so it gets 8 there. Dropout's Philox rounds need registers, so its tiles stream
    fewer keys. fp32 tiles take twice the bytes, and without TF32 their dots run on CUDA cores with the
    operands in registers, so they are smaller again.
    """
    wide = block_d > 64
    warps = 8 if wide else 4
    if dtype == torch.float32:
        if not allow_tf32:
            return {"forward": (Tiles(32, 16, 8, 1), Tiles(32, 16, 8, 2)),
                    "backward": (Tiles(32, 16, 8, 2),) if wide else (Tiles(32, 16, 8, 2), Tiles(32, 16, 4, 2)),
                    "deterministic": (Tiles(32, 16, 8, 2),)}[kernel]
        return {"forward": (Tiles(64, 32, warps, 2), Tiles(32, 32, 4, 2)),
                "backward": (Tiles(32, 16, 8, 2),) if wide else (Tiles(32, 16, 4, 2), Tiles(64, 32, 8, 2)),
                "deterministic": (Tiles(32, 16, warps, 2),)}[kernel]
    if kernel == "forward":
        if dropout:
            return Tiles(128, 32, 8, 3), Tiles(64, 32, 4, 3)
        return (Tiles(128, 64, 8 if wide or arch < 90 else 4, 3), Tiles(128, 32, warps, 3),
                Tiles(64, 64, 4, 3), Tiles(64, 32, 4, 4))
    if kernel == "backward":
        if wide:  # a 64-row key tile of 4 warps holding 128-wide dK and dV spills; 16-row query tiles do not
            if dropout:
                return Tiles(64, 16, 4, 3), Tiles(64, 32, 8, 2)
            return Tiles(128, 32, 8, 2), Tiles(64, 16, 4, 3)
        if dropout:
            return Tiles(128, 32, 8, 2), Tiles(64, 32, 4, 3)
        return Tiles(128, 32, 8, 2), Tiles(128, 64, 8, 2), Tiles(64, 32, 4, 3)
    if wide and dropout:
        return (Tiles(64, 32, 8, 2),)
    return Tiles(64, 32, warps, 2), Tiles(128, 32, 8, 2)


def attention_space_cases() -> dict[str, dict[Tiles, tuple[int, torch.dtype, bool, int, bool]]]:
    """Every tiling of every attention space on sm_80 to sm_90, per kernel, each with one
    (block_d, dtype, dropout, arch, allow_tf32) whose space holds it: a dropout one where there is one, so
    that the tests run dropout on every tiling that a dropout space holds."""
    cases = {kernel: {} for kernel in ATTENTION_KERNELS}
    for kernel in ATTENTION_KERNELS:
        for arch in _ARCHS:
            for block_d in _BLOCK_DS:
                for dtype in _DTYPES:
                    for dropout in (True, False):
                        for tf32 in ((False, True) if dtype == torch.float32 else (False,)):
                            for tiles in attention_space(kernel, block_d, dtype, dropout, arch, tf32):
                                cases[kernel].setdefault(tiles, (block_d, dtype, dropout, arch, tf32))
    return cases


def attention_configs(kernels: tuple[str, ...], held_name: str, streamed_name: str) -> list[triton.Config]:
    """Every tiling of these attention kernels' spaces as triton.Configs (the launch's early_config_prune then
    keeps those of its own space), naming the held and streamed block sizes as the kernel does."""
    if interpreter_enabled():
        all_tiles = [INTERPRETER_TILES]
    else:
        cases = attention_space_cases()
        all_tiles = list(dict.fromkeys(tiles for kernel in kernels for tiles in cases[kernel]))
    return [tiles_config(t, held_name, streamed_name) for t in all_tiles]


def tiles_config(tiles: Tiles, held_name: str, streamed_name: str) -> triton.Config:
    return triton.Config({held_name: tiles.held, streamed_name: tiles.streamed}, num_warps=tiles.warps,
                         num_stages=tiles.stages)


def config_tiles(config: triton.Config, held_name: str, streamed_name: str) -> Tiles:
    return Tiles(config.kwargs[held_name], config.kwargs[streamed_name], config.num_warps, config.num_stages)


def sequence_bucket(T: int) -> int:
    """The autotuning key's sequence length: a power of two from 128 to 16384, so that a new length (a
    KV-cache decode step, the last short batch) reuses the choice made for its bucket."""
    return min(max(triton.next_power_of_2(T), 128), 16384)


@torch.compiler.assume_constant_result  # torch.compile folds it instead of tracing into Triton's driver
def target_arch() -> int:
    """Compute capability Triton compiles for, e.g. 90 for sm_90 (an H100)."""
    return triton.runtime.driver.active.get_current_target().arch


def launch(kernel, grid, forced: triton.Config | None, *args, **meta) -> None:
    """Launch an autotuned kernel with the configuration tuned for its key, or with `forced` instead (its
    meta-parameters, warps and stages): how the tests run every configuration of a space."""
    if forced is None:
        kernel[grid](*args, **meta)
    else:
        kernel.fn[grid](*args, **meta, **forced.kwargs, num_warps=forced.num_warps, num_stages=forced.num_stages)


# -----------------------------------------------------------------------------
# LayerNorm / RMSNorm: the row block is the width (rounded up to a power of two, capped), so only the
# warps are tuned: about 4, 8 or 16 elements per thread.

def norm_warps(block_n: int) -> tuple[int, ...]:
    return tuple(sorted({min(max(block_n // per_thread // 32, 1), 16) for per_thread in (4, 8, 16)}))


def norm_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({}, num_warps=4)]
    return [triton.Config({}, num_warps=w) for w in (1, 2, 4, 8, 16)]


def prune_norm_configs(configs, named_args, **kwargs):
    """early_config_prune for the norm kernels: the warps of norm_warps(BLOCK_N)."""
    return [c for c in configs if c.num_warps in norm_warps(kwargs["BLOCK_N"])]


# -----------------------------------------------------------------------------
# Cross-entropy: the vocabulary tile (columns of one row per step) and the warps.

CROSS_ENTROPY_SPACE = ((1024, 4), (2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16))
INTERPRETER_VOCAB_BLOCK = 256


def cross_entropy_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK": INTERPRETER_VOCAB_BLOCK}, num_warps=4)]
    return [triton.Config({"BLOCK": block}, num_warps=warps) for block, warps in CROSS_ENTROPY_SPACE]


def cross_entropy_space(n_cols: int) -> tuple[tuple[int, int], ...]:
    """The (vocabulary tile, warps) pairs worth trying for a vocabulary of n_cols: tiles no wider than it
    (rounded up to a power of two); a tiny vocabulary keeps the smallest tile."""
    fitting = tuple((block, warps) for block, warps in CROSS_ENTROPY_SPACE
                    if block <= triton.next_power_of_2(n_cols))
    return fitting or CROSS_ENTROPY_SPACE[:1]


def prune_cross_entropy_configs(configs, named_args, **kwargs):
    keep = cross_entropy_space(named_args["n_cols"])
    return [c for c in configs if (c.kwargs["BLOCK"], c.num_warps) in keep]
