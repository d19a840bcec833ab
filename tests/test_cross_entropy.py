"""kernels/cross_entropy.py: the fused linear cross-entropy's loss and both gradients against float64
PyTorch, over row counts that split into ragged chunks, vocabularies that are not a multiple of the tile,
ignored targets (all of them too) and the softcap; in low precision the gradients under the FlashAttention
rule (error vs float64 at most about twice PyTorch's own result's in that dtype). On CPU the kernel runs in Triton's
interpreter, with the GPU's rounding of the gradients to bf16/fp16."""
import pytest
import torch

from conftest import KERNEL_DEVICE
from kernels.cross_entropy import chunk_rows, linear_cross_entropy, linear_cross_entropy_reference

SHAPES = [(1, 8, 5), (7, 16, 65), (37, 40, 300), (64, 24, 1000)]  # rows, width, vocab


def inputs(rows, width, vocab, dtype, ignore_every=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=generator).to(KERNEL_DEVICE, dtype)
    weight = (torch.randn(vocab, width, generator=generator) * 0.5).to(KERNEL_DEVICE, dtype)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    if ignore_every:
        targets[1::ignore_every] = -1
    return x, weight, targets.to(KERNEL_DEVICE)


def loss_and_grads(fn, x, weight, targets, softcap):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = fn(x, weight, targets, softcap)
    loss.backward()
    return loss.detach(), x.grad, weight.grad


def errors(result, expected):
    return [(a.double() - b).abs().max().item() for a, b in zip(result, expected)]


@pytest.mark.parametrize("rows, width, vocab", SHAPES)
@pytest.mark.parametrize("softcap", [0.0, 15.0])
def test_fp32_matches_float64(rows, width, vocab, softcap):
    x, weight, targets = inputs(rows, width, vocab, torch.float32)
    expected = loss_and_grads(linear_cross_entropy_reference, x.double(), weight.double(), targets, softcap)
    result = loss_and_grads(linear_cross_entropy, x, weight, targets, softcap)
    for error, name in zip(errors(result, expected), ("loss", "dx", "dweight")):
        assert error < 2e-5, (name, error)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, width, vocab", [SHAPES[1], SHAPES[3]])  # the fp32 test covers the ragged ones
@pytest.mark.parametrize("softcap", [0.0, 15.0])
def test_low_precision_within_twice_pytorchs_error(dtype, rows, width, vocab, softcap):
    x, weight, targets = inputs(rows, width, vocab, dtype)
    expected = loss_and_grads(linear_cross_entropy_reference, x.double(), weight.double(), targets, softcap)
    torch_errors = errors(loss_and_grads(linear_cross_entropy_reference, x, weight, targets, softcap), expected)
    kernel_errors = errors(loss_and_grads(linear_cross_entropy, x, weight, targets, softcap), expected)
    for name, ours, theirs in zip(("dx", "dweight"), kernel_errors[1:], torch_errors[1:]):
        assert ours <= 2 * theirs + 1e-5, (name, ours, theirs)
    # The loss: its error is the lm_head's rounding of the logits to the dtype, which both share (PyTorch's
    # bf16 softcap rounds once more, and may land nearer or farther by chance); from the same rounded
    # logits the kernel's fp32 logsumexp is exact to fp32.
    logits = (x @ weight.T).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    from_rounded_logits = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-1)
    loss = loss_and_grads(linear_cross_entropy, x, weight, targets, softcap)[0]
    torch.testing.assert_close(loss, from_rounded_logits, rtol=1e-5, atol=1e-5)


def test_every_target_ignored_is_nan_with_zero_gradients():
    x, weight, targets = inputs(6, 16, 65, torch.float32)
    loss, dx, dweight = loss_and_grads(linear_cross_entropy, x, weight, torch.full_like(targets, -1), 0.0)
    reference = loss_and_grads(linear_cross_entropy_reference, x, weight, torch.full_like(targets, -1), 0.0)
    assert loss.isnan() and reference[0].isnan()
    assert not dx.any() and not dweight.any()


def test_batched_input_and_the_upstream_gradient():
    """(B, T, width) input as the model passes it, and a loss scaled before backward (gradient accumulation)."""
    x, weight, targets = inputs(24, 16, 65, torch.float32)
    x3, t2 = x.reshape(4, 6, 16).detach().requires_grad_(), targets.reshape(4, 6)
    (linear_cross_entropy(x3, weight, t2) * 0.25).backward()
    x_ref = x.detach().double().requires_grad_()
    (linear_cross_entropy_reference(x_ref, weight.double(), targets) * 0.25).backward()
    torch.testing.assert_close(x3.grad.reshape(24, 16).double(), x_ref.grad, atol=2e-6, rtol=0)


def test_chunks_are_what_the_docstring_says():
    assert chunk_rows(32768, 768, 50304) == 512  # 512 x 50304 logits: about as large as x
    assert chunk_rows(10, 768, 100) >= 10  # a vocabulary narrower than x: one chunk


def test_bad_softcap_is_a_clear_error():
    x, weight, targets = inputs(2, 8, 5, torch.float32)
    with pytest.raises(ValueError, match="softcap must be 0"):
        linear_cross_entropy(x, weight, targets, -1.0)
