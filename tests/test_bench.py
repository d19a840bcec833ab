"""bench/: the FLOP and byte counts, the shared helpers, and each script end to end with --quick (CPU here;
the test marked gpu also runs the Triton rows)."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import attn, common, layernorm, recipe, sample
from bench import train as train_bench
from conftest import HAS_CUDA, REPO

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
ENV_KEYS = {"gpu", "torch", "triton", "cuda", "cpu", "cpu_cores", "date", "command", "git_commit"}
# script -> (table columns, rows of a --quick run on CPU)
SCRIPTS = {
    "attn": (["impl", "mode", "mask", "causal", "B", "T", "H", "D", "ms", "TFLOPS", "tiles_pct", "peak_MiB",
              "vs_sdpa", "vs_eager", "mem_vs_eager", "note"],
             3 * 3 * 2 * 3 + 2 * 3 * 4),  # eager, sdpa, sdpa_flash x modes x causal x 3 shapes; masked: 2 x 3 x 4
    "layernorm": (["impl", "mode", "M", "N", "ms", "GB_s", "pct_copy", "vs_torch", "vs_compile", "note"], 1 * 3 * 2),
    "train": (["model", "impl", "compile", "B", "T", "ms", "tok_s", "MFU_pct", "peak_MiB", "vs_sdpa", "vs_eager",
               "note"], 2),
    "sample": (["model", "new_tokens", "method", "exact", "s", "tok_s", "vs_nocache", "note"], 2 * 4 + 2 * 3),
    "cross_entropy": (["impl", "rows", "width", "vocab", "ms", "peak_MiB", "logits_MiB", "vs_torch", "mem_vs_torch",
                       "note"], 2 + 2 * 16),  # triton, torch measured; then the GPU shapes' arithmetic rows
}


def test_attention_flops_follow_flash_attentions_convention():
    # 4 * B * H * T^2 * D = 4 * 2 * 12 * 1024^2 * 64
    assert attn.attention_flops(2, 12, 1024, 64, False, "fwd") == 6_442_450_944
    assert attn.attention_flops(2, 12, 1024, 64, True, "fwd") == 3_221_225_472
    assert attn.attention_flops(2, 12, 1024, 64, True, "bwd") == 8_053_063_680  # 2.5x
    assert attn.attention_flops(1, 6, 512, 128, False, "fwd+bwd") == 2_818_572_288  # 3.5 * 4 * 6 * 512^2 * 128


def test_attention_shapes_keep_the_tokens_and_add_batch_1_at_the_longest_T():
    assert attn.attention_shapes([512, 1024, 2048, 4096, 8192, 16384], 16384) == [
        (32, 512), (16, 1024), (8, 2048), (4, 4096), (2, 8192), (1, 16384)]
    assert attn.attention_shapes([32, 64], 128) == [(4, 32), (2, 64), (1, 64)]


def test_layernorm_bytes_count_what_must_move():
    # forward: x in, y out (4096 x 768 bf16 each) + weight and bias in
    assert layernorm.layernorm_bytes(4096, 768, 2, "fwd") == 2 * 4096 * 768 * 2 + 2 * 768 * 2 == 12_585_984
    # backward: x, dy in, dx out + weight in, dweight and dbias out
    assert layernorm.layernorm_bytes(4096, 768, 2, "bwd") == 18_878_976
    assert layernorm.layernorm_bytes(4096, 768, 2, "fwd+bwd") == 31_464_960
    assert layernorm.layernorm_bytes(10, 100, 4, "fwd") == 8_800
    assert layernorm.gb_per_s(2e9, 1000.0) == pytest.approx(2.0)


def test_throughput_units():
    assert train_bench.tokens_per_s(12, 1024, 100.0) == pytest.approx(122_880)


def test_wall_ms_runs_fewer_times_past_its_budget():
    calls = []
    assert common.wall_ms(lambda: calls.append(1), "cpu", runs=4, warmup=1) >= 0 and len(calls) == 5
    common.wall_ms(lambda: calls.append(1), "cpu", runs=4, warmup=1, budget_s=0.0)
    assert len(calls) == 5 + 2  # the warm-up, then one timed call


def test_markdown_table_formats_values():
    rows = [{"impl": "a", "ms": 0.012345, "tok_s": 123456.7, "ok": True, "note": None},
            {"impl": "b", "ms": None, "tok_s": 12.0, "ok": False, "note": "OOM"}]
    assert common.markdown_table(rows, ["impl", "ms", "tok_s", "ok", "note"]).splitlines() == [
        "| impl | ms | tok_s | ok | note |",
        "|---|---|---|---|---|",
        "| a | 0.0123 | 123,457 | yes | - |",
        "| b | - | 12 | no | OOM |",
    ]


def test_add_ratio_matches_rows_by_keys():
    rows = [{"impl": "base", "T": 1, "ms": 4.0}, {"impl": "new", "T": 1, "ms": 2.0},
            {"impl": "new", "T": 2, "ms": 1.0}, {"impl": "base", "T": 3, "ms": None}, {"impl": "new", "T": 3, "ms": 1.0}]
    common.add_ratio(rows, "speedup", "ms", "base", ("T",))
    assert [r["speedup"] for r in rows] == [1.0, 2.0, None, None, None]
    common.add_ratio(rows, "ratio", "ms", "base", ("T",), speedup=False)
    assert rows[1]["ratio"] == 0.5


def raise_oom(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")


def test_attempt_turns_an_oom_into_a_note():
    assert common.attempt(lambda: common.time_ms(raise_oom, "cpu", rep_ms=1.0)) == (None, "OOM")
    assert common.attempt(lambda: 3) == (3, None)


def test_attempt_reports_other_errors_and_fails_the_exit_status():
    def broken():
        raise ValueError("bad shape\nmore detail")

    result, note = common.attempt(broken)
    assert result is None and note == "error: ValueError: bad shape"
    assert common.exit_status([{"note": "OOM"}, {"note": None}]) == 0
    assert common.exit_status([{"note": note}]) == 1


def test_an_oom_while_timing_is_a_table_entry():
    calls = []

    def runs_out_when_timed(q, k, v, causal):
        calls.append(1)
        if len(calls) > 1:  # the first call, the check, fits; the timed calls do not
            raise_oom()
        return attn.eager(q, k, v, causal)

    impls = {"eager": attn.eager, "big": runs_out_when_timed}
    rows = attn.bench_shape(impls, 1, 16, 2, 16, True, ["fwd"], "cpu", "float32", rep_ms=1.0)
    assert [(r["impl"], r["note"]) for r in rows] == [("eager", None), ("big", "OOM")]
    assert rows[1]["ms"] is None and rows[1]["TFLOPS"] is None and len(calls) == 2
    table = common.markdown_table(rows, attn.COLUMNS)
    assert table.splitlines()[-1].startswith("| big | fwd | - | yes | 1 | 16 | 2 | 16 | - | - |")
    assert table.endswith("| OOM |")
    assert common.exit_status(rows) == 0


def test_outputs_are_checked_before_timing():
    def wrong(q, k, v, causal):
        return attn.eager(q, k, v, causal) * 1.01

    rows = attn.bench_shape({"wrong": wrong}, 1, 16, 2, 16, False, ["fwd", "fwd+bwd"], "cpu", "float32", rep_ms=1.0)
    assert all(r["note"].startswith("MISMATCH") and r["ms"] is not None for r in rows)
    assert common.exit_status(rows) == 1
    ln_rows = layernorm.bench_width({"torch": lambda: layernorm.torch_layer_norm}, 8, 32, ["bwd"], "cpu", "float32",
                                    copy_gbs=10.0, rep_ms=1.0)
    assert ln_rows[0]["note"] is None and ln_rows[0]["error"] < 1e-5


def test_sample_exactness():
    from model import GPTConfig

    config = GPTConfig(block_size=256, n_layer=6)
    assert sample.is_exact(dict(use_cache=True), 1000, config)
    assert sample.is_exact(dict(use_cache=True, refill=128), 250, config)  # never outgrows the block
    assert not sample.is_exact(dict(use_cache=True, refill=128), 1000, config)
    rope = GPTConfig(block_size=256, n_layer=6, pos_embedding="rope")
    assert not sample.is_exact(dict(use_cache=True, roll=True), 1000, rope)
    assert sample.is_exact(dict(use_cache=True, roll=True), 250, rope)
    assert sample.is_exact(dict(use_cache=True, roll=True), 1000, GPTConfig(block_size=256, n_layer=1, pos_embedding="rope"))


def run_script(name, tmp_path, *args):
    # One thread: on a shared CPU, torch's thread pool waiting on a busy core makes tiny runs crawl.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "bench" / f"{name}.py"), "--quick", "--out", str(tmp_path), *args]
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def table_rows(text, columns):
    lines = text.splitlines()
    start = lines.index("| " + " | ".join(columns) + " |")
    return [line for line in lines[start + 2:] if line.startswith("| ")]


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_script_runs_quick_and_writes_results(name, tmp_path):
    columns, n_rows = SCRIPTS[name]
    out = run_script(name, tmp_path)
    printed = table_rows(out.stdout, columns)  # raises if the header is missing
    assert all(line.count(" | ") == len(columns) - 1 for line in printed)
    assert table_rows((tmp_path / f"{name}.md").read_text(), columns) == printed
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert ENV_KEYS <= set(record["environment"])
    assert record["environment"]["torch"] == torch.__version__
    assert record["columns"] == columns and len(record["rows"]) == len(printed)
    assert (tmp_path / f"{name}.png").exists() == HAS_MATPLOTLIB
    if not HAS_CUDA:
        assert len(printed) == n_rows
        # no mismatch, no failure: the only notes name SDPA's default backend
        assert all(row["note"] is None or (row["impl"] == "sdpa" and row["note"].startswith("backend: "))
                   for row in record["rows"])
        if name not in ("sample", "cross_entropy"):  # cross_entropy runs its kernel in the interpreter
            assert "triton: not run; the Triton kernels need a CUDA GPU" in out.stdout
    if name == "cross_entropy":
        # Measured, not computed: the peak of what forward + backward allocate (the profiler's count on CPU).
        peak = {row["impl"]: row["peak_MiB"] for row in record["rows"] if row.get("peak_MiB") is not None}
        assert 0 < peak["triton"] < peak["torch"] / 2


@pytest.mark.gpu
@pytest.mark.parametrize("name, args", [("attn", ["--head_dim", "64", "128"]),
                                        ("layernorm", ["--impl", "triton", "torch", "torch.compile"]),
                                        ("train", ["--compile", "both"]), ("sample", []), ("cross_entropy", [])])
def test_script_runs_the_triton_rows_on_gpu(name, args, tmp_path):
    run_script(name, tmp_path, *args)
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert record["environment"]["gpu"]
    assert all(row["note"] is None for row in record["rows"]), record["rows"]
    if name != "sample":
        triton_rows = [row for row in record["rows"] if row["impl"] == "triton"]
        assert triton_rows and all(row["ms"] for row in triton_rows)


def test_train_bench_times_train_py_step_with_train_py_settings(monkeypatch):
    """No copy of the step or of the settings: the bench calls loop.train_step with what train.py (and,
    for shakespeare_char, its config file) sets, read from train.py itself."""
    from tritongpt import loop

    steps = []
    monkeypatch.setattr(train_bench, "train_step", lambda *args: steps.append(args) or loop.train_step(*args))
    gpt2, char = train_bench.train_config("gpt2"), train_bench.train_config("shakespeare_char")
    assert (gpt2["n_layer"], gpt2["n_embd"], gpt2["block_size"], gpt2["batch_size"]) == (12, 768, 1024, 12)
    assert (char["n_layer"], char["n_embd"], char["block_size"], char["dropout"]) == (6, 384, 256, 0.2)
    assert gpt2["learning_rate"] == 6e-4 and gpt2["grad_clip"] == 1.0
    config = train_bench.train_config("tiny")
    train_bench.bench_step(config, train_bench.model_config(config, 65), 2, "sdpa", False, "cpu", "float32", 1, 1)
    assert len(steps) >= 2 and steps[0][5] == config["grad_clip"]  # warm-up and timed steps, train.py's clip


def test_recipe_bench_trains_both_recipes_on_train_py_functions(tmp_path):
    data = tmp_path / "data"
    subprocess.run([sys.executable, str(REPO / "prepare" / "shakespeare_char.py"), "--data_dir", str(data)],
                   check=True, capture_output=True, timeout=300)
    out = run_script("recipe", tmp_path, "--data_dir", str(data), "--ablation")
    rows = table_rows(out.stdout, ["recipe", "steps", "seconds", "tokens_M", "val_loss", "s_to_target",
                                   "steps_to_target", "vs_gpt2"])
    assert [r.split(" | ")[0].strip("| ") for r in rows] == ["gpt2", "modern", *recipe.ABLATIONS]
    assert (tmp_path / "recipe.json").is_file()
    modern = recipe.recipes(ablation=False, quick=True)["modern"]
    assert modern["optimizer"] == "muon" and modern["pos_embedding"] == "rope" and modern["n_layer"] == 1


def test_gpu_report_parts_fit_seven_minutes_and_cover_every_benchmark_and_the_whole_suite():
    from bench import gpu_report

    gpu_parts = gpu_report.parts(gpu=True, workers=15)
    assert sum(part.gpu_limit_s for part in gpu_parts) <= gpu_report.GPU_BUDGET_S == 7 * 60
    assert [part.benchmark for part in gpu_parts] == ["layernorm", "cross_entropy", "attn", "train", None]
    tests = gpu_parts[-1].command  # last: the slowest
    assert tests[:2] == ["-m", "pytest"] and "-n" in tests and not any(arg.startswith("tests/") for arg in tests)
    assert "-m" not in tests[2:]  # every test, not only those marked gpu
    assert all("--quick" in part.command for part in gpu_report.parts(gpu=False) if part.benchmark)


def test_gpu_report_headlines_read_the_benchmarks_results():
    from bench import gpu_report

    measured = ((0.8, 150.0), (1.2, 310.0), (1.0, None))
    attn_rows = [{"impl": "triton", "mode": "fwd+bwd", "vs_sdpa": v, "TFLOPS": t} for v, t in measured]
    assert gpu_report.headline("attn", {"rows": attn_rows}) == "triton fwd+bwd vs sdpa: median 1x, best 310 TFLOPS"
    no_triton = gpu_report.headline("layernorm", {"rows": [{"impl": "torch"}]})
    assert no_triton == "Triton rows not run: they need a CUDA GPU"
    train_rows = [{"model": "gpt2", "impl": "sdpa", "compile": True, "tok_s": 100.0},
                  {"model": "gpt2", "impl": "triton+ce", "compile": False, "tok_s": 150.0},
                  {"model": "gpt2", "impl": "eager", "compile": False, "tok_s": None}]
    assert gpu_report.headline("train", {"rows": train_rows}) == "gpt2: fastest triton+ce 150 tok/s"


def test_gpu_report_without_a_gpu_says_so_and_runs_the_cpu_parts(tmp_path, monkeypatch):
    from bench import gpu_report

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # its parts' processes see no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # nor does it
    assert gpu_report.main(["--out", str(tmp_path), "--only", "layernorm", "tests"]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "no GPU" in summary and "[layernorm.md](layernorm.md)" in summary
    record = json.loads((tmp_path / "summary.json").read_text())
    assert record["gpu"] is False and ENV_KEYS <= record["environment"].keys()
    assert [(part["name"], part["status"]) for part in record["parts"]] == [("layernorm", "ok"), ("tests", "ok")]
    results = gpu_report.read_test_results(tmp_path / gpu_report.TESTS_RESULTS)
    assert len(results) > 60 and {r["outcome"] for r in results} == {"passed"}
    assert record["parts"][1]["headline"] == f"{len(results)} passed"
    assert (tmp_path / "layernorm.json").exists() and (tmp_path / "logs" / "layernorm.log").exists()


def test_a_part_past_its_limit_is_stopped_with_all_its_processes(tmp_path):
    """A part cut by its limit: its whole process group goes (pytest-xdist's workers would be grandchildren),
    and what it wrote before stays."""
    from bench import gpu_report

    code = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(120)']); print(child.pid, flush=True); time.sleep(120)")
    part = gpu_report.Part("tests", ["-c", code], gpu_limit_s=3)
    (tmp_path / "logs").mkdir()
    gpu_report.run_part(part, tmp_path, part.gpu_limit_s)
    assert part.status == "stopped at its 3 s limit (see logs/tests.log)" and part.seconds < 15
    grandchild = Path("/proc") / (tmp_path / "logs" / "tests.log").read_text().split()[0] / "stat"
    time.sleep(0.5)
    # gone, or a zombie (state Z) waiting for an init that reaps nothing: not running either way
    assert not grandchild.exists() or grandchild.read_text().split()[2] == "Z"


def test_the_masked_attention_rows_count_what_the_mask_leaves():
    """tiles_pct and the visible share, against counting by hand: two documents of 8 in a row of 16 (4x4 tiles)."""
    from tritongpt.ops import AttentionMask

    starts = torch.tensor([[0] * 8 + [8] * 8])
    ends = torch.tensor([[8] * 8 + [16] * 8])
    mask = AttentionMask(starts, ends, 0)
    assert attn.visible_share(mask, 16) == (2 * 36) / 136  # two triangles of 8 against one of 16
    assert attn.visible_share(mask, 16, (4, 4)) == 6 / 10  # 3 + 3 of the causal 10 tiles
    assert attn.visible_share(AttentionMask(None, None, 4), 16, (4, 4)) == 7 / 10  # the diagonal and below it
    packed = attn.packed_documents(2, 64, None, 10, seed=0)
    assert packed.starts.shape == (2, 64) and (packed.starts <= torch.arange(64)).all()
    assert (packed.starts[:, 0] == 0).all() and (packed.ends > torch.arange(64)).all()


def test_documents_bench_trains_every_variant_on_the_standard_library(tmp_path):
    out = run_script("documents", tmp_path, "--data_dir", str(tmp_path / "stdlib"))
    rows = table_rows(out.stdout, ["variant", "steps", "seconds", "val_loss", "vs_causal_seconds"])
    assert [r.split(" | ")[0].strip("| ") for r in rows] == ["causal", "documents", "documents + positions",
                                                            "documents + window 16"]
    record = json.loads((tmp_path / "documents.json").read_text())
    assert all(row["steps"] == 10 and math.isfinite(row["val_loss"]) for row in record["rows"])
    tokens = np.fromfile(tmp_path / "stdlib" / "train.bin", dtype=np.uint16)
    assert (tokens == 50256).sum() >= 5  # one document per module, each starting with <|endoftext|>
