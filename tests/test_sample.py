"""sample.py end to end: checkpoints with a char vocabulary or GPT-2 BPE, prompts, streaming, EOT."""
import os
import pickle
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from model import GPT, GPTConfig

CHARS = sorted(set("ROMEO: JULIET, thou art\n"))


def save_checkpoint(out_dir, model, dataset):
    out_dir.mkdir(parents=True, exist_ok=True)
    model_args = {k: getattr(model.config, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")}
    ckpt = {"model": model.state_dict(), "optimizer": {}, "model_args": model_args, "iter_num": 0, "best_val_loss": 9.9,
            "config": {"dataset": dataset}}
    torch.save(ckpt, out_dir / "ckpt.pt")


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    """A directory with a char-vocabulary checkpoint and the dataset's meta.pkl where sample.py looks."""
    root = tmp_path_factory.mktemp("sample")
    (root / "data" / "tiny_char").mkdir(parents=True)
    meta = {"vocab_size": len(CHARS), "itos": dict(enumerate(CHARS)), "stoi": {c: i for i, c in enumerate(CHARS)}}
    with open(root / "data" / "tiny_char" / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=len(CHARS), n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(root / "out", model, "tiny_char")
    return root


def run_sample(cwd, *args, check=True):
    out = subprocess.run([sys.executable, str(REPO / "sample.py"), "--device=cpu", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def samples(stdout: str, separator="---------------") -> list[str]:
    return [s.strip("\n") for s in stdout.split(separator)[:-1]]


def test_char_samples_continue_the_prompt(char_run):
    out = run_sample(char_run, "--out_dir=out", "--start=ROMEO:", "--num_samples=3", "--max_new_tokens=40")
    texts = samples(out.stdout.split("(its meta file)\n", 1)[1])
    assert len(texts) == 3 and all(t.startswith("ROMEO:") and len(t) == len("ROMEO:") + 40 for t in texts)
    assert set("".join(texts)) <= set(CHARS)
    assert len(set(texts)) > 1  # sampled, not greedy


def test_greedy_stream_prints_what_the_batch_prints_and_past_block_size(char_run, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("JULIET, thou art")
    common = ["--out_dir=out", f"--start=FILE:{prompt}", "--num_samples=2", "--max_new_tokens=30", "--temperature=0"]
    batch = samples(run_sample(char_run, *common).stdout.split("(its meta file)\n", 1)[1])
    streamed = samples(run_sample(char_run, *common, "--stream=True").stdout.split("(its meta file)\n", 1)[1])
    no_cache = samples(run_sample(char_run, *common, "--kv_cache=False").stdout.split("(its meta file)\n", 1)[1])
    assert batch == streamed == no_cache
    assert batch[0] == batch[1] and batch[0].startswith("JULIET, thou art")


def test_prompt_errors(char_run):
    out = run_sample(char_run, "--out_dir=out", "--start=xyz?", check=False)
    assert out.returncode != 0 and "outside the model's vocabulary" in out.stderr
    out = run_sample(char_run, "--out_dir=out", "--start=FILE:nope.txt", check=False)
    assert out.returncode != 0 and "nope.txt not found" in out.stderr
    out = run_sample(char_run, "--out_dir=missing", check=False)
    assert out.returncode != 0 and "no checkpoint in missing (looked for ckpt.pt" in out.stderr
    (char_run / "sharded" / "ckpt_dcp").mkdir(parents=True)  # a save killed before it wrote anything
    out = run_sample(char_run, "--out_dir=sharded", check=False)
    assert out.returncode != 0 and "ckpt_dcp is not a whole sharded checkpoint" in out.stderr
    assert "Traceback" not in out.stderr


def test_gpt2_bpe_and_stop_at_eot(tmp_path):
    """Without a meta.pkl the tokenizer is GPT-2's; a model that always predicts <|endoftext|> stops at once."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=32))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()  # the final hidden state is ln_f.bias at every position...
        model.transformer.ln_f.bias.copy_(torch.randn(32))
        model.transformer.wte.weight[50256] = 10 * model.transformer.ln_f.bias  # ...whose top logit is EOT
    save_checkpoint(tmp_path / "out", model, "not_prepared")
    common = ["--out_dir=out", "--start=Hello world", "--num_samples=1", "--max_new_tokens=5", "--temperature=0"]
    assert samples(run_sample(tmp_path, *common).stdout) == ["Hello world" + "<|endoftext|>" * 5]
    assert samples(run_sample(tmp_path, *common, "--stop_at_eot=True").stdout) == ["Hello world"]


# Every sampling setting's check and message is tested in-process in test_sampling.py; here one of them, and
# sample.py's own, reach the user as one line without a traceback.
@pytest.mark.parametrize("option,message", [
    ("--top_p=0", None),  # greedy, never a crash
    ("--top_k=0", "top_k must be an integer >= 1"),
    ("--num_samples=0", "num_samples must be >= 1, got 0"),
])
def test_sampling_settings_are_checked(char_run, option, message):
    out = run_sample(char_run, "--out_dir=out", "--start=ROMEO:", "--num_samples=2", "--max_new_tokens=10", option,
                     check=message is None)
    if message is None:
        texts = samples(out.stdout.split("(its meta file)\n", 1)[1])
        assert len(texts) == 2 and texts[0] == texts[1]  # top_p=0 keeps only the most likely token
    else:
        assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr


def test_gpt2_tokenizer_that_cannot_be_had_is_a_clear_error(tmp_path):
    """tiktoken fetches GPT-2's BPE files on first use: offline (here: its fetch fails) sample.py says what to
    do in one line."""
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "out", GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=32)),
                    "not_prepared")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import requests, tiktoken.load\n"
        "def offline(path):\n"
        "    raise requests.ConnectionError(f'no route to {path}')\n"
        "tiktoken.load.read_file = offline\n")
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty_cache"), "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, str(REPO / "sample.py"), "--device=cpu", "--out_dir=out", "--max_new_tokens=2"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "Could not load the GPT-2 tokenizer" in out.stderr and "TIKTOKEN_CACHE_DIR" in out.stderr


class ScriptedModel(torch.nn.Module):
    """Stands in for a GPT in generate_text: its stream yields the given columns of tokens, one per step."""

    def __init__(self, columns: list[list[int]]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.columns = columns

    def generate_stream(self, idx, max_new_tokens, temperature, top_k, **kwargs):
        for column in self.columns[:max_new_tokens]:
            yield torch.tensor(column).unsqueeze(1)


def test_stop_at_eot_ends_each_sample_at_its_own_eot():
    """Three samples: the first ends at step 1, the second at step 3, the third never. A sample that has ended
    gets no more tokens while the others go on."""
    from sample import SamplingSettings, Tokenizer, generate_text

    eot = 0  # decoded as "|"; ids 1..26 are the letters a..z
    tokenizer = Tokenizer(lambda text: [ord(c) - 96 for c in text],
                          lambda ids: "".join("|" if i == eot else chr(96 + i) for i in ids).encode(), eot)
    steps = [[1, 2, 3], [eot, 2, 3], [4, 5, 6], [5, eot, 7], [6, 8, 8]]  # each step: samples 0, 1, 2
    streamed = []
    texts = generate_text(ScriptedModel(steps), tokenizer, [26], 3, SamplingSettings(max_new_tokens=5, stop_at_eot=True),
                          on_token=streamed.append)
    assert texts == ["za", "zbbe", "zccfgh"]
    assert streamed == [b"a"]  # sample 0's tokens, up to its end
    everything = generate_text(ScriptedModel(steps), tokenizer, [26], 3, SamplingSettings(max_new_tokens=5))
    assert everything == ["za|def", "zbbe|h", "zccfgh"]


def test_a_prompt_file_that_is_not_utf8_is_a_clear_error(tmp_path):
    from sample import read_prompt

    (tmp_path / "latin1.txt").write_bytes("caf".encode() + "é".encode("latin-1"))
    with pytest.raises(SystemExit, match=r"error: prompt file .*latin1\.txt is not UTF-8 text \(byte 0xe9 at offset "
                                         r"3\); convert it"):
        read_prompt(f"FILE:{tmp_path / 'latin1.txt'}")
    (tmp_path / "utf8.txt").write_text("café", encoding="utf-8")
    assert read_prompt(f"FILE:{tmp_path / 'utf8.txt'}") == "café" and read_prompt("plain") == "plain"
