"""prepare/text.py: custom corpora, char and GPT-2 BPE."""
import glob
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prepare import common, text
from tritongpt import data

REPO = Path(__file__).resolve().parent.parent
DOCS = {
    "b.txt": "Second file, sorted after a.txt.\r\nWith Windows line endings.\r\n",
    "a.txt": "First file: plain ASCII.\nTwo lines.\n",
    "c.txt": "Ünïcödé — “quotes”, emoji 🙂 and <|endoftext|> as plain text.\n",
}


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "in").mkdir()
    for name, content in DOCS.items():
        (tmp_path / "in" / name).write_bytes(content.encode("utf-8"))
    return tmp_path


def read_tokens(path: Path) -> list[int]:
    return np.fromfile(path, dtype=np.uint16).tolist()


def test_char_corpus_cli(corpus):
    command = [sys.executable, str(REPO / "prepare" / "text.py"), "--name", "mine", "--input", "in/*.txt"]
    result = subprocess.run(command, cwd=corpus, capture_output=True, text=True, env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    out = corpus / "data" / "mine"
    # Files in name order, line endings normalized, concatenated; the last 10% is val.
    stream = "".join(DOCS[name].replace("\r\n", "\n") for name in sorted(DOCS))
    chars = sorted(set(stream))
    n_train = int(len(stream) * 0.9)
    train, val = read_tokens(out / "train.bin"), read_tokens(out / "val.bin")
    assert (len(train), len(val)) == (n_train, len(stream) - n_train)
    assert "".join(chars[i] for i in train + val) == stream
    expected_meta = io.BytesIO()
    pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                 "stoi": {ch: i for i, ch in enumerate(chars)}}, expected_meta)
    assert (out / "meta.pkl").read_bytes() == expected_meta.getvalue()
    assert f"train has {n_train:,} tokens" in result.stdout


def test_gpt2_corpus(corpus, monkeypatch):
    monkeypatch.chdir(corpus)
    (corpus / "data" / "mine").mkdir(parents=True)
    (corpus / "data" / "mine" / "meta.pkl").write_bytes(b"left from a char run")
    (corpus / "data" / "mine" / "meta.json").write_bytes(b"left from a char run")
    text.main(["--name", "mine", "--input", "in/c.txt", "in/*.txt", "--tokenizer", "gpt2", "--val_fraction", "0.25"])
    enc = data.gpt2_encoding()
    # c.txt named first comes first, and is not read twice; every document starts with EOT.
    order = ["c.txt", "a.txt", "b.txt"]
    stream = [t for name in order for t in [50256] + enc.encode_ordinary(DOCS[name].replace("\r\n", "\n"))]
    n_train = int(len(stream) * 0.75)
    out = corpus / "data" / "mine"
    assert read_tokens(out / "train.bin") == stream[:n_train]
    assert read_tokens(out / "val.bin") == stream[n_train:]
    assert stream.count(50256) == 3
    assert not (out / "meta.pkl").exists() and not (out / "meta.json").exists()  # stale, they would mislead train.py


def test_input_errors(corpus, monkeypatch):
    monkeypatch.chdir(corpus)
    with pytest.raises(common.PrepareError, match=r"--input 'nothing/\*\.txt' matched no files"):
        text.main(["--name", "x", "--input", "nothing/*.txt"])
    with pytest.raises(common.PrepareError, match=r"--input in is a directory; .* e\.g\. 'in/\*\.txt'"):
        text.main(["--name", "x", "--input", "in"])
    (corpus / "empty.txt").write_bytes(b"")
    with pytest.raises(common.PrepareError, match="hold no text"):
        text.main(["--name", "x", "--input", "empty.txt"])
    (corpus / "latin1.txt").write_bytes(b"good start, then caf" + "é".encode("latin-1") + b" more")
    with pytest.raises(common.PrepareError, match=r"latin1\.txt is not UTF-8: byte 0xe9 at offset 20"):
        text.main(["--name", "x", "--input", "in/*.txt", "latin1.txt"])
    with pytest.raises(common.PrepareError, match="val_fraction"):
        text.main(["--name", "x", "--input", "in/*.txt", "--val_fraction", "1"])
    with pytest.raises(common.PrepareError, match="plain directory name"):
        text.main(["--name", "../x", "--input", "in/*.txt"])
    (corpus / "tiny.txt").write_text("a")
    with pytest.raises(common.PrepareError, match="too few to split"):
        text.main(["--name", "x", "--input", "tiny.txt"])
    assert not (corpus / "data").exists()  # nothing written by a failed run


def test_char_vocabulary_too_large(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # 65,537 distinct characters, skipping the surrogates, which UTF-8 cannot encode.
    chars = [chr(c) for c in range(0x20, 0x20 + 65_537 + 2048) if not 0xD800 <= c < 0xE000]
    (tmp_path / "wide.txt").write_text("".join(chars[:65_537]), encoding="utf-8")
    with pytest.raises(common.PrepareError, match="65,537 distinct characters.*use the gpt2 tokenizer"):
        text.main(["--name", "x", "--input", "wide.txt"])


def test_a_file_reached_by_several_names_is_read_once(corpus, monkeypatch):
    """A symlink to a file and a loop of linked folders under ** reach the same files again and again: each is
    one document all the same, so none lands in both train and val."""
    monkeypatch.chdir(corpus)
    (corpus / "in" / "again.txt").symlink_to(corpus / "in" / "a.txt")
    (corpus / "in" / "loop").symlink_to(corpus / "in", target_is_directory=True)
    assert len(glob.glob("in/**/*.txt", recursive=True)) > 10  # the loop, followed many times
    files = text.input_files(["in/**/*.txt"])
    assert [path.resolve() for path in files] == [(corpus / "in" / name).resolve() for name in sorted(DOCS)]
    text.main(["--name", "looped", "--input", "in/**/*.txt", "--tokenizer", "gpt2"])
    tokens = read_tokens(corpus / "data" / "looped" / "train.bin") + read_tokens(corpus / "data" / "looped" / "val.bin")
    assert tokens.count(common.EOT) == len(DOCS)
