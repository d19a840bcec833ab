"""pipeline.py's parts that need no processes: how layers split into stages, the bubble, the checks made
before any work starts, and that the stages of every rank, run one after the other, are the whole model.
The schedules across processes are in test_distributed.py."""
import copy

import pytest
import torch

from tritongpt import pipeline
from model import GPT, GPTConfig
from tritongpt.parallelism import Layout, LayoutError


@pytest.mark.parametrize("n_layer, n_stages, sizes", [(12, 4, [3, 3, 3, 3]), (5, 2, [2, 3]), (7, 3, [2, 3, 2]),
                                                      (4, 4, [1, 1, 1, 1]), (48, 5, [10, 9, 10, 9, 10])])
def test_stages_split_the_layers_evenly_and_in_order(n_layer, n_stages, sizes):
    layers = pipeline.stage_layers(n_layer, n_stages)
    assert [len(r) for r in layers] == sizes
    assert [i for r in layers for i in r] == list(range(n_layer))


def test_bubble_fraction():
    assert pipeline.bubble_fraction(1, 8) == 0
    assert pipeline.bubble_fraction(2, 4) == pytest.approx(1 / 5)
    assert pipeline.bubble_fraction(4, 8, 2) == pytest.approx(3 / 19)  # interleaving shrinks it
    assert pipeline.bubble_fraction(8, 64) < pipeline.bubble_fraction(8, 8)


CONFIG = GPTConfig(n_layer=4, n_head=2, n_embd=16, block_size=8, vocab_size=37)


@pytest.mark.parametrize("change, message", [
    (dict(schedule="zero_bubble"), "pipeline_schedule must be one of"),
    (dict(layout=Layout(pipeline=8)), "8 pipeline stages need at least one layer each"),
    (dict(schedule="interleaved_1f1b", layout=Layout(pipeline=4)), "8 pipeline stages need at least one layer"),
    (dict(microbatches=1), "needs at least as many micro-batches per step as pipeline ranks"),
    (dict(schedule="interleaved_1f1b", interleaved_stages=1), "pipeline_stages_per_rank must be >= 2"),
    (dict(schedule="interleaved_1f1b", microbatches=5), "multiple of pipeline_parallel"),
    (dict(dtype="float16"), "use dtype='bfloat16'"),
])
def test_what_a_pipeline_cannot_run_is_a_clear_error(change, message):
    settings = dict(config=CONFIG, layout=Layout(pipeline=2), schedule="1f1b", interleaved_stages=2, microbatches=4,
                    dtype="float32") | change
    with pytest.raises(LayoutError, match=message):
        pipeline.check_pipeline(**settings)


def test_gpipe_runs_fewer_micro_batches_than_stages():
    pipeline.check_pipeline(CONFIG, Layout(pipeline=4), "gpipe", 2, 1, "float32")


@pytest.mark.parametrize("schedule, pipeline_parallel", [("1f1b", 2), ("1f1b", 4), ("interleaved_1f1b", 2)])
@pytest.mark.parametrize("switches", [{}, dict(pos_embedding="rope", tie_embeddings=False, logit_softcap=5.0)],
                         ids=["gpt2", "modern"])
def test_the_stages_of_all_ranks_are_the_whole_model(schedule, pipeline_parallel, switches):
    """Each rank's pruned model keeps the whole model's parameter names; together they hold every
    parameter once (a tied matrix on the first and last stage), and their stages run in order compute
    the whole model's logits."""
    torch.manual_seed(0)
    whole = GPT(GPTConfig(**{**vars(CONFIG), **switches}), "sdpa", "torch")
    idx = torch.randint(0, CONFIG.vocab_size, (3, CONFIG.block_size))
    parts = [pipeline.split_model(copy.deepcopy(whole), Layout(pipeline=pipeline_parallel, rank=rank), schedule, 2)
             for rank in range(pipeline_parallel)]
    names = [name for model, _ in parts for name in model.state_dict()]
    expected = whole.state_dict()
    tied = {"transformer.wte.weight", "lm_head.weight"} if whole.config.tie_embeddings else set()
    assert sorted(set(names)) == sorted(expected)
    assert sorted(name for name in names if name not in tied) == sorted(name for name in expected if name not in tied)
    for model, _ in parts:
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
    stages = sorted(((index, stage) for rank, (_, own) in enumerate(parts) for index, stage in
                     zip(range(rank, 99, pipeline_parallel), own)), key=lambda pair: pair[0])
    assert stages[0][1].first and stages[-1][1].last and not any(s.first or s.last for _, s in stages[1:-1])
    x = idx
    for _, stage in stages:
        x = stage(x)
    torch.testing.assert_close(x, whole(idx, idx)[0], rtol=0, atol=0)


def test_own_state_keeps_what_a_part_holds():
    whole = GPT(CONFIG, "sdpa", "torch")
    last, _ = pipeline.split_model(copy.deepcopy(whole), Layout(pipeline=2, rank=1), "1f1b", 2)
    optimizer_state = {"state": {"transformer.h.0.ln_1.weight": {"step": 1},
                                 "transformer.h.3.ln_1.weight": {"step": 2}},
                       "param_groups": [{"lr": 1.0, "params": ["transformer.h.0.ln_1.weight",
                                                               "transformer.h.3.ln_1.weight"]}]}
    cut = pipeline.own_state({"model": whole.state_dict(), "optimizer": optimizer_state}, last)
    assert set(cut["model"]) == set(last.state_dict())
    assert "transformer.wte.weight" in cut["model"] and "transformer.h.0.attn.c_attn.weight" not in cut["model"]
    assert cut["optimizer"]["state"] == {"transformer.h.3.ln_1.weight": {"step": 2}}
    assert cut["optimizer"]["param_groups"] == [{"lr": 1.0, "params": ["transformer.h.3.ln_1.weight"]}]
