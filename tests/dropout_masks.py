"""The keep-mask flash attention's dropout applies, for tests to hand to attention_reference: the kernels'
own random-number formula (`_dropout_keep`, a function of the score's global index and the seed) run over
the whole (B, H, T, T) grid with tiles of its own, so a mask that matches also shows the formula does not
depend on the tiling."""
import torch
import triton
import triton.language as tl

from kernels.common import interpreter_enabled
from kernels.flash_attention import _dropout_keep, _seed_tensor


@triton.jit
def _dropout_mask_kernel(MASK, SEED, T, dropout_p, BLOCK: tl.constexpr):
    seed = tl.load(SEED)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    bh = tl.program_id(2)
    keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], T, dropout_p)
    tl.store(MASK + (bh.to(tl.int64) * T + rows[:, None]) * T + cols[None, :], keep.to(tl.int8),
             mask=(rows[:, None] < T) & (cols[None, :] < T))


def dropout_mask(seed: int, B: int, H: int, T: int, dropout_p: float, device) -> torch.Tensor:
    """The (B, H, T, T) bool keep-mask that flash_attention(..., dropout_p, seed=seed) applies."""
    mask = torch.empty(B, H, T, T, dtype=torch.int8, device=device)
    block = 16 if interpreter_enabled() else 64
    _dropout_mask_kernel[(triton.cdiv(T, block), triton.cdiv(T, block), B * H)](
        mask, _seed_tensor(seed, device), T, dropout_p, BLOCK=block)
    return mask.view(torch.bool)
