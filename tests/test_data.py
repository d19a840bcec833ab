"""data.py: the token formats and the TokenSplit loader."""
import json
import pickle
import time

import numpy as np
import pytest
import torch

from tritongpt import data


def shard_bytes(tokens, magic=data.SHARD_MAGIC, version=data.SHARD_VERSION, count=None) -> bytes:
    """An llm.c shard built by hand from the format's description, independently of data.write_shard."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    return header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes()


def test_prepare_command():
    assert data.prepare_command("shakespeare_char") == "python prepare/shakespeare_char.py"
    assert data.prepare_command("shakespeare") == "python prepare/shakespeare.py"
    assert data.prepare_command("fineweb") == "python prepare/fineweb.py --dataset fineweb"
    assert data.prepare_command("fineweb_edu") == "python prepare/fineweb.py --dataset fineweb_edu"
    assert data.prepare_command("poems") == "python prepare/text.py --name poems --input 'your/*.txt'"


def test_write_tokens_is_raw_uint16(tmp_path):
    tokens = [0, 1, 65535, 300, 7]
    data.write_tokens(tmp_path / "train.bin", tokens)
    assert (tmp_path / "train.bin").read_bytes() == np.array(tokens, dtype=np.uint16).tobytes()
    assert [p.name for p in tmp_path.iterdir()] == ["train.bin"]  # no temp file left behind


def test_write_shard_layout_and_header(tmp_path):
    tokens = np.arange(1000, dtype=np.int64) * 37 % 50257
    data.write_shard(tmp_path / "x_train_000001.bin", tokens)
    assert (tmp_path / "x_train_000001.bin").read_bytes() == shard_bytes(tokens)
    assert data.read_shard_header(tmp_path / "x_train_000001.bin") == 1000


@pytest.mark.parametrize("bad", [[-1], [65536], [1.5]])
def test_write_rejects_ids_that_do_not_fit(tmp_path, bad):
    with pytest.raises(ValueError, match="token ids"):
        data.write_tokens(tmp_path / "train.bin", [1, 2] + bad)
    with pytest.raises(ValueError, match="token ids"):
        data.write_shard(tmp_path / "a_train_0.bin", [1, 2] + bad)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_old_file(tmp_path):
    data.write_tokens(tmp_path / "train.bin", [1, 2, 3])
    with pytest.raises(KeyboardInterrupt), data.atomic_open(tmp_path / "train.bin") as f:
        f.write(b"half a file")
        raise KeyboardInterrupt
    with pytest.raises(ValueError):
        data.write_tokens(tmp_path / "train.bin", [70000])
    assert (tmp_path / "train.bin").read_bytes() == np.array([1, 2, 3], dtype=np.uint16).tobytes()
    assert [p.name for p in tmp_path.iterdir()] == ["train.bin"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(magic=123), "bad magic number 123"),
    (dict(version=2), "version 2"),
    (dict(count=99), "header says 99 tokens"),
    (dict(count=101), "header says 101 tokens"),
])
def test_bad_shard_header_names_file_and_problem(tmp_path, kwargs, message):
    path = tmp_path / "d_val_000000.bin"
    path.write_bytes(shard_bytes(np.arange(100), **kwargs))
    with pytest.raises(ValueError, match=message) as e:
        data.TokenSplit(tmp_path, "val")
    assert str(path) in str(e.value)


def test_truncated_shard_header(tmp_path):
    (tmp_path / "d_val_000000.bin").write_bytes(shard_bytes([1, 2, 3])[:500])
    with pytest.raises(ValueError, match="too small"):
        data.TokenSplit(tmp_path, "val")


def test_odd_raw_size(tmp_path):
    (tmp_path / "train.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match="odd size") as e:
        data.TokenSplit(tmp_path, "train")
    assert str(tmp_path / "train.bin") in str(e.value)


def test_missing_dataset_says_how_to_create_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"python prepare/shakespeare_char\.py"):
        data.TokenSplit("data/shakespeare_char", "train")
    (tmp_path / "data" / "poems").mkdir(parents=True)
    (tmp_path / "data" / "poems" / "val.bin").write_bytes(b"\0\0")
    with pytest.raises(FileNotFoundError, match=r"no train data.*python prepare/text\.py --name poems"):
        data.TokenSplit("data/poems", "train")
    # Elsewhere than data/<dataset>, the command has to say where to write.
    with pytest.raises(FileNotFoundError, match=r"prepare/fineweb\.py --dataset fineweb --data_dir elsewhere/fw"):
        data.TokenSplit("elsewhere/fw", "train", dataset="fineweb")


def test_both_formats_in_one_directory_is_an_error(tmp_path):
    data.write_tokens(tmp_path / "train.bin", [1, 2, 3])
    data.write_shard(tmp_path / "x_train_000001.bin", [1, 2, 3])
    with pytest.raises(ValueError, match="one format"):
        data.TokenSplit(tmp_path, "train")


def test_raw_split_matches_nanogpt_sampling(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65, 5000)
    data.write_tokens(tmp_path / "train.bin", tokens)
    split = data.TokenSplit(tmp_path, "train", vocab_size=65)
    assert split.num_tokens == 5000
    x, y = split.get_batch(8, 32, torch.Generator().manual_seed(42))
    # nanoGPT's get_batch, given the same generator.
    ix = torch.randint(5000 - 32, (8,), generator=torch.Generator().manual_seed(42))
    expect_x = torch.stack([torch.from_numpy(tokens[i:i + 32].astype(np.int64)) for i in ix])
    expect_y = torch.stack([torch.from_numpy(tokens[i + 1:i + 33].astype(np.int64)) for i in ix])
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (8, 32)
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x, expect_x) and torch.equal(y, expect_y)


def test_get_batch_is_deterministic_and_resumable(tmp_path):
    data.write_tokens(tmp_path / "val.bin", np.arange(3000) % 1000)
    split = data.TokenSplit(tmp_path, "val")
    g = torch.Generator().manual_seed(7)
    first = split.get_batch(4, 16, g)
    state = g.get_state()
    second = split.get_batch(4, 16, g)
    again = split.get_batch(4, 16, torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    g.set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(second, split.get_batch(4, 16, g)))
    assert not torch.equal(first[0], second[0])


def test_shards_are_sampled_by_their_number_of_windows(tmp_path):
    # Shard k holds tokens 1000*k + position, so every window tells which shard and offset it came from.
    sizes = [600, 2000, 5, 4000]
    for k, n in enumerate(sizes):
        data.write_shard(tmp_path / f"toy_train_{k:06d}.bin", 1000 * k + np.arange(n) % 1000)
    data.write_shard(tmp_path / "toy_val_000000.bin", np.arange(50))
    split = data.TokenSplit(tmp_path, "train", vocab_size=4000)
    assert split.num_tokens == sum(sizes)
    assert [p.name for p in split.paths] == [f"toy_train_{k:06d}.bin" for k in range(4)]
    block = 100
    x, y = split.get_batch(20000, block, torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 1:], y[:, :-1])
    shard = x[:, 0] // 1000
    # y continues x inside the same shard: no window crosses a file boundary.
    assert torch.equal(y[:, -1] // 1000, shard)
    assert torch.equal(y[:, -1] % 1000, (x[:, -1] + 1) % 1000)
    windows = np.array([max(n - block, 0) for n in sizes])
    share = np.bincount(shard.numpy(), minlength=4) / len(shard)
    np.testing.assert_allclose(share, windows / windows.sum(), atol=0.02)
    assert share[2] == 0  # too short for one window


def test_split_too_small_for_block_size(tmp_path):
    data.write_tokens(tmp_path / "val.bin", np.arange(64))
    split = data.TokenSplit(tmp_path, "val")
    split.get_batch(2, 63, torch.Generator())  # 64 tokens: exactly one window
    with pytest.raises(ValueError, match=r"too small for block_size=64.*has 64 tokens"):
        split.get_batch(2, 64, torch.Generator())


def test_vocab_check_at_startup_names_file_and_id(tmp_path):
    tokens = np.zeros(1000, dtype=np.int64)
    tokens[777] = 70
    data.write_tokens(tmp_path / "train.bin", tokens)
    with pytest.raises(ValueError, match=r"token id 70 at position 777 is >= vocab_size 65") as e:
        data.TokenSplit(tmp_path, "train", vocab_size=65)
    assert str(tmp_path / "train.bin") in str(e.value)
    data.TokenSplit(tmp_path, "train", vocab_size=71)


def test_vocab_check_on_a_large_file_is_sampled(tmp_path, monkeypatch):
    # Shrink the "large file" threshold so a small file takes the sampled path.
    monkeypatch.setattr(data, "VOCAB_CHECK_FULL_TOKENS", 1024)
    monkeypatch.setattr(data, "VOCAB_CHECK_CHUNKS", 4)
    tokens = np.zeros(100_000, dtype=np.int64)
    tokens[-1] = 99  # the last chunk always ends at the end of the file
    data.write_shard(tmp_path / "a_train_000001.bin", tokens)
    with pytest.raises(ValueError, match=r"a_train_000001\.bin: token id 99 at position 99,999"):
        data.TokenSplit(tmp_path, "train", vocab_size=50)
    tokens[-1], tokens[50_000] = 0, 99  # between the sampled chunks: missed at start-up ...
    data.write_shard(tmp_path / "a_train_000001.bin", tokens)
    split = data.TokenSplit(tmp_path, "train", vocab_size=50)
    # ... but caught in the batch that draws it.
    with pytest.raises(ValueError, match=r"token id 99 at position 50,000 is >= vocab_size 50"):
        for seed in range(200):
            split.get_batch(64, 512, torch.Generator().manual_seed(seed))


def test_vocab_check_reads_little_of_a_huge_file(tmp_path):
    # 1G tokens (a 2 GB sparse file): scanned in full this would take seconds and 2 GB of reads.
    path = tmp_path / "big_train_000001.bin"
    with open(path, "wb") as f:
        f.write(shard_bytes([], count=1 << 30))
        f.truncate(data.SHARD_HEADER_BYTES + 2 * (1 << 30))
    start = time.perf_counter()
    split = data.TokenSplit(tmp_path, "train", vocab_size=50257)
    assert time.perf_counter() - start < 2.0
    assert split.num_tokens == 1 << 30


META = {"vocab_size": 3, "itos": {0: "a", 1: "b", 2: "\u00e9"}, "stoi": {"a": 0, "b": 1, "\u00e9": 2}}


def test_meta_round_trip(tmp_path):
    assert data.load_meta(tmp_path) is None
    data.write_meta(tmp_path, META)
    assert (tmp_path / "meta.pkl").read_bytes() == pickle.dumps(META)  # nanoGPT's bytes
    assert json.loads((tmp_path / "meta.json").read_text(encoding="utf-8")) == {"vocab_size": 3,
                                                                                "itos": ["a", "b", "\u00e9"]}
    assert data.load_meta(tmp_path) == META
    (tmp_path / "meta.json").unlink()  # nanoGPT's dataset: meta.pkl alone
    assert data.load_meta(tmp_path) == META
    assert data.remove_meta(tmp_path) == [tmp_path / "meta.pkl"] and data.load_meta(tmp_path) is None


@pytest.mark.parametrize("name, content, message", [
    ("meta.pkl", b"\x80\x04garbage", "UnpicklingError"),
    ("meta.pkl", pickle.dumps([1, 2]), "vocab_size"),
    ("meta.pkl", pickle.dumps({"vocab_size": 2, "itos": {0: "a"}, "stoi": {"a": 0}}), "each id 0..1"),
    ("meta.pkl", pickle.dumps({"vocab_size": 1, "itos": {0: "a"}, "stoi": {"b": 0}}), "inverse"),
    ("meta.json", b"{not json", "JSONDecodeError"),
    ("meta.json", json.dumps({"vocab_size": "3", "itos": ["a"]}).encode(), "vocab_size"),
])
def test_a_broken_meta_file_is_a_clear_error(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=rf"{name} is not a usable dataset vocabulary.*{message}.*delete it"):
        data.load_meta(tmp_path)


def test_meta_files_that_disagree_are_refused(tmp_path):
    data.write_meta(tmp_path, META)
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 1, "itos": {0: "z"}, "stoi": {"z": 0}}))
    with pytest.raises(ValueError, match="hold different vocabularies"):
        data.load_meta(tmp_path)


class CreatesAFile:
    """Unpickling this calls open(path, "w"): any code could run in its place."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_meta_pkl_that_would_run_code_runs_nothing(tmp_path):
    marker = tmp_path / "created_by_unpickling"
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 3, "itos": CreatesAFile(marker)}))
    with pytest.raises(ValueError, match=r"meta\.pkl is not a usable dataset vocabulary .*names io\.open"):
        data.load_meta(tmp_path)
    assert not marker.exists()
