"""Token files on disk and the training batch loader.

A dataset is a directory, data/<name>, holding its tokens in one of two formats:

- nanoGPT: train.bin and val.bin, raw uint16 token ids with no header, plus meta.pkl
  ({'vocab_size', 'itos', 'stoi'}) when the vocabulary is characters rather than GPT-2 BPE (our prepare
  scripts write the same vocabulary to meta.json too, which is what this project reads first).
- llm.c / modded-nanogpt shards: *_train_*.bin and *_val_*.bin, each a header of 256 int32
  (magic 20240520, version 1, token count, the rest zero) followed by the uint16 tokens.
  A split may span many shards; they are read in name order.

TokenSplit samples training windows from either, the way nanoGPT does: a fresh np.memmap per
batch, random offsets drawn from a torch.Generator the caller owns.
"""
import json
import os
import pickle
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
import tiktoken
import torch

from tritongpt.configurator import UserError
from tritongpt.fileio import atomic_open

TOKEN_DTYPE = np.uint16
MAX_TOKEN_ID = np.iinfo(TOKEN_DTYPE).max
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * np.dtype(np.int32).itemsize
# The token count lives in an int32 header slot.
MAX_SHARD_TOKENS = np.iinfo(np.int32).max
# Start-up vocabulary check: files up to this many tokens are scanned in full, larger ones on
# VOCAB_CHECK_CHUNKS evenly spaced chunks adding up to the same amount, so the check costs about
# the same 32 MB of reads for a 20 GB file as for a 32 MB one.
VOCAB_CHECK_FULL_TOKENS = 1 << 24
VOCAB_CHECK_CHUNKS = 64


class TokenizerError(UserError, RuntimeError):
    """GPT-2's tokenizer could not be had; the message says how to get it."""


def tiktoken_cache_dir() -> str:
    """Where tiktoken keeps its downloaded vocabulary files (its own rule, from tiktoken/load.py)."""
    return (os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
            or os.path.join(tempfile.gettempdir(), "data-gym-cache"))


def gpt2_encoding():
    """tiktoken's GPT-2 BPE. tiktoken downloads its vocabulary files once and caches them."""
    try:
        return tiktoken.get_encoding("gpt2")
    except (requests.RequestException, OSError) as e:
        raise TokenizerError(
            f"Could not load the GPT-2 tokenizer ({type(e).__name__}: {e}). tiktoken downloads its vocabulary "
            "files from openaipublic.blob.core.windows.net on first use: check your internet connection, or "
            "set TIKTOKEN_CACHE_DIR to a directory holding tiktoken's cached GPT-2 files"
        ) from e
    except ValueError as e:  # tiktoken's check of the files' sha256 failed: a corrupted or intercepted download
        raise TokenizerError(
            f"The GPT-2 tokenizer files tiktoken got are corrupt ({e}). Delete tiktoken's cache directory "
            f"{tiktoken_cache_dir()} and run this again (behind a proxy that rewrites downloads, fetch the files "
            "elsewhere and set TIKTOKEN_CACHE_DIR to a directory holding them)"
        ) from e


def prepare_command(dataset: str) -> str:
    """The command that creates data/<dataset>."""
    if dataset == "shakespeare_char":
        return "python prepare/shakespeare_char.py"
    if dataset == "shakespeare":
        return "python prepare/shakespeare.py"
    if dataset in ("fineweb", "fineweb_edu"):
        return f"python prepare/fineweb.py --dataset {dataset}"
    return f"python prepare/text.py --name {shlex.quote(dataset)} --input 'your/*.txt'"


def _as_tokens(tokens, what: str) -> np.ndarray:
    """`tokens` as a uint16 array, refusing anything that would wrap around silently."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"{what}: tokens must be a 1-D sequence, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(TOKEN_DTYPE)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what}: token ids must be integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > MAX_TOKEN_ID:
        raise ValueError(
            f"{what}: token ids must be in [0, {MAX_TOKEN_ID}] to fit uint16, got min {lo} and max {hi}; "
            "a vocabulary this large needs a different token format"
        )
    return arr.astype(TOKEN_DTYPE, copy=False)


def write_tokens(path: str | Path, tokens) -> None:
    """Write nanoGPT's raw format: the uint16 ids and nothing else (what np.ndarray.tofile writes)."""
    arr = _as_tokens(tokens, str(path))
    with atomic_open(path, size_hint=arr.nbytes) as f:
        f.write(arr.tobytes())


def write_shard(path: str | Path, tokens) -> None:
    """Write an llm.c shard: the 256-int32 header, then the uint16 ids."""
    arr = _as_tokens(tokens, str(path))
    if arr.size > MAX_SHARD_TOKENS:
        raise ValueError(f"{path}: {arr.size:,} tokens is more than a shard header can count ({MAX_SHARD_TOKENS:,})")
    header = np.zeros(SHARD_HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, arr.size
    with atomic_open(path, size_hint=header.nbytes + arr.nbytes) as f:
        f.write(header.tobytes())
        f.write(arr.tobytes())


def read_shard_header(path: str | Path) -> int:
    """Check a shard's header against its file size and return its token count."""
    path = Path(path)
    size = path.stat().st_size
    if size < SHARD_HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is too small for the {SHARD_HEADER_BYTES}-byte shard header; "
                         "the file is truncated, delete it and re-create it")
    header = np.fromfile(path, dtype=np.int32, count=SHARD_HEADER_INTS)
    magic, version, num_tokens = (int(v) for v in header[:3])
    if magic != SHARD_MAGIC:
        raise ValueError(
            f"{path}: bad magic number {magic} (an llm.c shard starts with {SHARD_MAGIC}). If this is a raw "
            "nanoGPT token file, name it train.bin or val.bin; shard names (*_train_*.bin, *_val_*.bin) "
            "are for files with the shard header"
        )
    if version != SHARD_VERSION:
        raise ValueError(f"{path}: shard version {version} is not supported (expected {SHARD_VERSION}: uint16 tokens)")
    expected = SHARD_HEADER_BYTES + num_tokens * np.dtype(TOKEN_DTYPE).itemsize
    if num_tokens < 0 or size != expected:
        raise ValueError(
            f"{path}: header says {num_tokens:,} tokens, which is a {expected:,}-byte file, but the file has "
            f"{size:,} bytes; it is truncated or corrupt, delete it and re-create it"
        )
    return num_tokens


def raw_token_count(path: str | Path) -> int:
    """The number of tokens in a raw nanoGPT file, which must be whole uint16s."""
    path = Path(path)
    size = path.stat().st_size
    if size % np.dtype(TOKEN_DTYPE).itemsize:
        raise ValueError(f"{path}: {size:,} bytes is an odd size for uint16 tokens; the file is truncated or "
                         "not a token file, delete it and re-create it")
    return size // np.dtype(TOKEN_DTYPE).itemsize


META_JSON = "meta.json"  # ours: plain JSON, which cannot carry code
META_PKL = "meta.pkl"  # nanoGPT's, written too so that nanoGPT's scripts read our datasets


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Unpickles plain data only. A pickle can call a function only after naming it (find_class), and this
    names none, so nothing in the file can run; nanoGPT's meta.pkl, a dict of ints and strings, loads."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it names {module}.{name}, and a dataset meta file holds plain data only")


def write_meta(data_dir: str | Path, meta: dict) -> None:
    """A char dataset's vocabulary: meta.json (what this project reads) and meta.pkl pickled exactly as
    nanoGPT does (default protocol), for nanoGPT's train.py and sample.py."""
    data_dir = Path(data_dir)
    itos = [meta["itos"][i] for i in range(meta["vocab_size"])]
    with atomic_open(data_dir / META_JSON) as f:
        f.write(json.dumps({"vocab_size": meta["vocab_size"], "itos": itos}, ensure_ascii=False).encode())
    with atomic_open(data_dir / META_PKL) as f:
        pickle.dump(meta, f)


def remove_meta(data_dir: str | Path) -> list[Path]:
    """Delete a dataset's vocabulary files (a dataset re-made with GPT-2 BPE has none); returns those deleted."""
    removed = [Path(data_dir) / name for name in (META_JSON, META_PKL) if (Path(data_dir) / name).exists()]
    for path in removed:
        path.unlink()
    return removed


def _read_meta_json(path: Path) -> dict:
    raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or not isinstance(raw.get("itos"), list):
        raise ValueError("expected an object with 'vocab_size' and an 'itos' list")
    return {"vocab_size": raw.get("vocab_size"), "itos": dict(enumerate(raw["itos"])),
            "stoi": {ch: i for i, ch in enumerate(raw["itos"])}}


def _read_meta_pkl(path: Path) -> dict:
    with open(path, "rb") as f:
        return _NoGlobalsUnpickler(f).load()


def _check_meta(meta: object) -> None:
    """nanoGPT's shape: vocab_size, itos (id -> character) and stoi (its inverse), ids 0..vocab_size-1."""
    if not isinstance(meta, dict) or type(meta.get("vocab_size")) is not int or meta["vocab_size"] < 1:
        raise ValueError("expected a dict with an int 'vocab_size' >= 1")
    itos, stoi = meta.get("itos"), meta.get("stoi")
    if not isinstance(itos, dict) or not isinstance(stoi, dict):
        raise ValueError("expected 'itos' and 'stoi' dicts")
    if sorted(itos) != list(range(meta["vocab_size"])) or not all(isinstance(ch, str) for ch in itos.values()):
        raise ValueError(f"'itos' must map each id 0..{meta['vocab_size'] - 1} to a string")
    if stoi != {ch: i for i, ch in itos.items()}:
        raise ValueError("'stoi' is not the inverse of 'itos'")


def load_meta(data_dir: str | Path) -> dict | None:
    """A char dataset's vocabulary (vocab_size, itos, stoi) from meta.json or nanoGPT's meta.pkl, or None
    for datasets without one (GPT-2 BPE). Reading either runs no code; when both are there they must agree."""
    data_dir = Path(data_dir)
    fix = f"delete it and re-create the dataset with `{prepare_command(data_dir.name)}`"
    found = {}
    for name, read in ((META_JSON, _read_meta_json), (META_PKL, _read_meta_pkl)):
        path = data_dir / name
        if not path.exists():
            continue
        try:
            found[name] = read(path)
            _check_meta(found[name])
        # Reading damaged bytes fails with almost any exception type, all meaning the same thing here.
        except Exception as e:
            raise ValueError(f"{path} is not a usable dataset vocabulary ({type(e).__name__}: {e}); {fix}") from None
    if len(found) == 2 and found[META_JSON] != found[META_PKL]:
        raise ValueError(f"{data_dir / META_JSON} and {data_dir / META_PKL} hold different vocabularies (one is left "
                         f"from another dataset); re-create the dataset with `{prepare_command(data_dir.name)}`")
    return next(iter(found.values()), None)


def _first_id_out_of_range(tokens: np.ndarray, vocab_size: int) -> tuple[int, int] | None:
    """(position, id) of the first id >= vocab_size in `tokens`, or None."""
    if tokens.size == 0 or int(tokens.max()) < vocab_size:
        return None
    pos = int(np.argmax(tokens >= vocab_size))
    return pos, int(tokens[pos])


class TokenSplit:
    """One split (train or val) of a dataset directory, in either format, sampled as nanoGPT does."""

    def __init__(self, data_dir: str | Path, split: str, dataset: str | None = None, vocab_size: int | None = None):
        self.data_dir = Path(data_dir)
        self.split = split
        self.dataset = dataset if dataset is not None else self.data_dir.name
        self.vocab_size = vocab_size
        self.paths, self.header_bytes = self._find_files()
        self.counts = np.array([self._count(p) for p in self.paths], dtype=np.int64)
        self.num_tokens = int(self.counts.sum())
        if vocab_size is not None:
            for i in range(len(self.paths)):
                self._check_vocab(i)

    def _create_hint(self) -> str:
        cmd = prepare_command(self.dataset)
        if self.data_dir != Path("data") / self.dataset:
            cmd += f" --data_dir {shlex.quote(str(self.data_dir))}"
        return f"Create it with: {cmd}"

    def _find_files(self) -> tuple[list[Path], int]:
        """The split's files and the size of the header before the tokens in each."""
        if not self.data_dir.is_dir():
            raise FileNotFoundError(f"Dataset directory {self.data_dir} does not exist. {self._create_hint()}")
        raw = self.data_dir / f"{self.split}.bin"
        shards = sorted(self.data_dir.glob(f"*_{self.split}_*.bin"))
        if raw.exists() and shards:
            raise ValueError(
                f"{self.data_dir} holds both {raw.name} and {len(shards)} shard(s) like {shards[0].name} for the "
                f"{self.split} split; a dataset directory must hold one format, move one of them elsewhere"
            )
        if raw.exists():
            return [raw], 0
        if shards:
            return shards, SHARD_HEADER_BYTES
        raise FileNotFoundError(
            f"{self.data_dir} has no {self.split} data (looked for {raw.name} and *_{self.split}_*.bin shards). "
            f"{self._create_hint()}"
        )

    def _count(self, path: Path) -> int:
        return raw_token_count(path) if self.header_bytes == 0 else read_shard_header(path)

    def _memmap(self, i: int) -> np.memmap:
        return np.memmap(self.paths[i], dtype=TOKEN_DTYPE, mode="r", offset=self.header_bytes,
                         shape=(int(self.counts[i]),))

    def _vocab_error(self, path: Path, pos: int, token: int) -> ValueError:
        return ValueError(
            f"{path}: token id {token} at position {pos:,} is >= vocab_size {self.vocab_size}; the data was "
            f"tokenized with a different vocabulary than the model's. Re-create it ({prepare_command(self.dataset)}) "
            "or use a vocab_size that covers it"
        )

    def _check_vocab(self, i: int) -> None:
        count = int(self.counts[i])
        if count == 0:
            return
        tokens = self._memmap(i)
        if count <= VOCAB_CHECK_FULL_TOKENS:
            starts, chunk = [0], count
        else:
            chunk = VOCAB_CHECK_FULL_TOKENS // VOCAB_CHECK_CHUNKS
            starts = np.linspace(0, count - chunk, VOCAB_CHECK_CHUNKS, dtype=np.int64).tolist()
        for start in starts:
            bad = _first_id_out_of_range(np.asarray(tokens[start:start + chunk]), self.vocab_size)
            if bad is not None:
                raise self._vocab_error(self.paths[i], start + bad[0], bad[1])

    def windows(self, block_size: int) -> np.ndarray:
        """How many windows of block_size + 1 tokens start in each file; a ValueError if there are none."""
        windows = np.maximum(self.counts - block_size, 0)
        if windows.sum() == 0:
            raise ValueError(
                f"The {self.split} split in {self.data_dir} is too small for block_size={block_size}: a window needs "
                f"block_size+1 = {block_size + 1:,} tokens from one file, but the split has {self.num_tokens:,} tokens"
                f" and its largest file {int(self.counts.max()):,}. Use a smaller block_size or more data"
            )
        return windows

    def get_batch(self, batch_size: int, block_size: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 CPU tensors of shape (batch_size, block_size), y being x shifted one token ahead.

        Windows never cross a file boundary. Each file gets a share of the batch proportional to its
        number of windows (tokens - block_size): with a single file this draws the very same offsets as
        nanoGPT's torch.randint(len(data) - block_size, (batch_size,)). All randomness comes from
        `generator`, so saving its state is enough for an exact resume.
        """
        if batch_size < 1 or block_size < 1:
            raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size} and {block_size}")
        if generator.device.type != "cpu":
            raise ValueError(f"get_batch needs a CPU torch.Generator, got one on {generator.device}")
        windows = self.windows(block_size)
        ix = torch.randint(int(windows.sum()), (batch_size,), generator=generator).numpy()
        ends = np.cumsum(windows)
        # side="right" skips files with no windows: their end equals the previous file's end.
        file_ix = np.searchsorted(ends, ix, side="right")
        starts = ix - (ends[file_ix] - windows[file_ix])
        rows = np.empty((batch_size, block_size + 1), dtype=np.int64)
        # A fresh memmap per batch, as in nanoGPT: a long-lived one keeps every page it ever touched
        # mapped, and resident memory creeps up over millions of steps.
        for i in np.unique(file_ix):
            tokens = self._memmap(int(i))
            for row in np.flatnonzero(file_ix == i):
                rows[row] = tokens[starts[row]:starts[row] + block_size + 1]
        if self.vocab_size is not None and int(rows.max()) >= self.vocab_size:
            row = int(np.argmax(rows.max(axis=1) >= self.vocab_size))
            pos, token = _first_id_out_of_range(rows[row], self.vocab_size)
            raise self._vocab_error(self.paths[file_ix[row]], int(starts[row]) + pos, token)
        x = torch.from_numpy(rows[:, :-1].copy())
        y = torch.from_numpy(rows[:, 1:].copy())
        return x, y


def open_splits(data_dir: str | Path, dataset: str, vocab_size: int, block_size: int) -> dict[str, TokenSplit]:
    """The train and val splits of a dataset directory, each checked to hold one window of block_size + 1
    tokens now rather than at the first eval."""
    splits = {split: TokenSplit(data_dir, split, dataset, vocab_size) for split in ("train", "val")}
    for split in splits.values():
        split.windows(block_size)
    return splits


# -----------------------------------------------------------------------------
# Which batch each micro-step sees

Batch = tuple[torch.Tensor, torch.Tensor]


def batch_seed(*parts: int) -> int:
    """A seed for one batch, a pure function of (seed, stream, step, index), with stream 0 for training and
    1, 2 for the eval splits: the data stream is the same whatever the number of processes, and a resumed
    run draws exactly the batches it would have drawn."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class Batches:
    """Draws the batches of a run: split, then (seed, stream, step, index) names the batch."""

    splits: dict[str, TokenSplit]
    batch_size: int
    block_size: int
    device: torch.device
    seed: int

    def get(self, split: str, *seed_parts: int) -> Batch:
        generator = torch.Generator().manual_seed(batch_seed(self.seed, *seed_parts))
        x, y = self.splits[split].get_batch(self.batch_size, self.block_size, generator)
        if self.device.type == "cuda":
            # pinned memory lets the copy to the GPU run asynchronously (non_blocking)
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def train(self, iter_num: int, micro_step: int) -> Batch:
        """The micro_step-th batch of a training step, counted over all processes."""
        return self.get("train", 0, iter_num, micro_step)

    def eval(self, split: str, k: int) -> Batch:
        """The k-th eval batch of a split: the same at every eval, so evals compare."""
        return self.get(split, 1 + ("train", "val").index(split), k)
