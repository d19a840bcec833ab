"""parallelism.py's pure parts: layouts, the checks made before any work starts, and c_attn's row orders.
The engines themselves (tensor and data parallel over several processes) are in test_distributed.py."""
import re

import pytest
import torch

from tritongpt import parallelism
from model import GPT, GPTConfig


@pytest.mark.parametrize("world_size, tensor_parallel, pipeline_parallel, data",
                         [(1, 1, 1, 1), (2, 2, 1, 1), (4, 2, 1, 2), (8, 4, 1, 2), (6, 3, 1, 2), (2, 1, 2, 1),
                          (8, 2, 2, 2), (12, 2, 3, 2)])
def test_layout_splits_the_processes(world_size, tensor_parallel, pipeline_parallel, data):
    layouts = [parallelism.plan_layout(world_size, rank, tensor_parallel, pipeline_parallel)
               for rank in range(world_size)]
    assert {(layout.data, layout.pipeline, layout.tensor) for layout in layouts} == \
        {(data, pipeline_parallel, tensor_parallel)}
    # ranks count tensor fastest (a tensor group is neighbouring ranks), then pipeline stage, then data
    coordinates = [(layout.data_rank, layout.pipeline_rank, layout.rank % tensor_parallel) for layout in layouts]
    expected = [(d, p, t) for d in range(data) for p in range(pipeline_parallel) for t in range(tensor_parallel)]
    assert coordinates == expected


@pytest.mark.parametrize("world_size, tensor_parallel, pipeline_parallel, message", [
    (3, 2, 1, "3 process(es) cannot be split into groups of tensor_parallel x pipeline_parallel = 2 x 1"),
    (1, 2, 1, "run a multiple of 2 processes"),
    (4, 2, 4, "run a multiple of 8 processes"),
    (2, 0, 1, "tensor_parallel must be >= 1"),
    (2, 1, 0, "pipeline_parallel must be >= 1"),
])
def test_impossible_layouts_are_clear_errors(world_size, tensor_parallel, pipeline_parallel, message):
    with pytest.raises(parallelism.LayoutError, match=re.escape(message)):
        parallelism.plan_layout(world_size, 0, tensor_parallel, pipeline_parallel)


@pytest.mark.parametrize("change, message", [
    (dict(config=GPTConfig(n_head=12, n_embd=768), tensor_parallel=8), "n_head=12 must be divisible"),
    (dict(device_type="mps"), "collective backend for 'mps'"),
    (dict(dtype="float16"), "use dtype='bfloat16'"),
])
def test_what_tensor_parallel_cannot_do_is_a_clear_error(change, message):
    settings = dict(config=GPTConfig(n_head=4, n_embd=64), tensor_parallel=2, device_type="cpu", dtype="float32") | change
    with pytest.raises(parallelism.LayoutError, match=message):
        parallelism.check_tensor_parallel(**settings)
    parallelism.check_tensor_parallel(**(settings | dict(tensor_parallel=1)))  # one rank: nothing to split


@pytest.mark.parametrize("n_head, head_dim, tensor_parallel", [(4, 8, 2), (6, 5, 3), (8, 3, 8), (2, 4, 1)])
def test_qkv_rank_order_gives_each_rank_its_heads(n_head, head_dim, tensor_parallel):
    """After the reorder, a contiguous split of c_attn's rows gives rank r exactly the q, k and v rows of
    heads r*H/tp .. (r+1)*H/tp - 1, found here by name rather than by the formula."""
    width = n_head * head_dim
    names = [(part, head, i) for part in "qkv" for head in range(n_head) for i in range(head_dim)]
    weight = torch.arange(3 * width, dtype=torch.float64)[:, None].expand(3 * width, 5).clone()
    bias = torch.arange(3 * width, dtype=torch.float64)
    for tensor in (weight, bias):
        reordered = parallelism.qkv_to_rank_order(tensor, tensor_parallel)
        heads_per_rank = n_head // tensor_parallel
        for rank, chunk in enumerate(reordered.chunk(tensor_parallel)):
            rows = chunk if chunk.dim() == 1 else chunk[:, 0]
            got = [names[int(row)] for row in rows]
            mine = range(rank * heads_per_rank, (rank + 1) * heads_per_rank)
            assert got == [(part, head, i) for part in "qkv" for head in mine for i in range(head_dim)]
        torch.testing.assert_close(parallelism.qkv_to_canonical(reordered, tensor_parallel), tensor, rtol=0, atol=0)


def test_rank_order_state_reorders_weights_and_optimizer_moments_only():
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=16, block_size=8, vocab_size=11))
    weight = model.transformer.h[1].attn.c_attn.weight.detach().clone()
    state = {"model": model.state_dict(),
             "optimizer": {"state": {"transformer.h.1.attn.c_attn.weight": {"step": torch.tensor(3.0),
                                                                            "exp_avg": weight.clone()}},
                           "param_groups": []}}
    parallelism.rank_order_state(state, 2)
    expected = parallelism.qkv_to_rank_order(weight, 2)
    torch.testing.assert_close(state["model"]["transformer.h.1.attn.c_attn.weight"], expected, rtol=0, atol=0)
    moments = state["optimizer"]["state"]["transformer.h.1.attn.c_attn.weight"]
    torch.testing.assert_close(moments["exp_avg"], expected, rtol=0, atol=0)
    assert moments["step"].item() == 3.0
    torch.testing.assert_close(state["model"]["transformer.h.1.attn.c_proj.weight"],
                               model.transformer.h[1].attn.c_proj.weight, rtol=0, atol=0)
