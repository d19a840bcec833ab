"""FineWeb-Edu (or FineWeb) sample-10BT in GPT-2 tokens, as llm.c shards: data/fineweb_edu/*.bin.

    python prepare/fineweb.py [--dataset fineweb_edu|fineweb] [--data_dir DIR] [--shard_size 100000000]
                              [--max_tokens N] [--shards N] [--workers N] [--hub_url URL]

Then train with `python train.py --dataset=fineweb_edu` (or fineweb).

- The parquet files of the Hugging Face dataset's sample/10BT folder (HuggingFaceFW/fineweb-edu, or
  HuggingFaceFW/fineweb with --dataset fineweb) are listed with the hub's API and downloaded one by one,
  as the tokenizer needs them, into DIR/parquet/: resumable, retried, checked against the size and
  sha256 the hub lists. Keep them until every shard is written (a re-run reads them again to find its
  place); delete DIR/parquet afterwards to free the space.
- Documents, in file and row order, are encoded with tiktoken's GPT-2 encode_ordinary in a pool of
  --workers processes; each starts with the end-of-text token 50256. The token stream is cut into shards
  of --shard_size tokens (a document can straddle two): fineweb_val_000000.bin is the first shard,
  fineweb_train_000001.bin, fineweb_train_000002.bin, ... the rest. Each is an llm.c shard (see data.py):
  a 256-int32 header (magic 20240520, version 1, token count), then uint16 tokens.
- --max_tokens stops after that many tokens in all, --shards after that many train shards (plus val):
  a small subset for a quick run. The last shard is shorter when the stream ends inside it.
- Re-running keeps the shards already written and continues after them; an interrupted run loses at
  most the shard it was filling.
- The dataset's main branch is resolved to a commit once, recorded in DIR/hub_revision.json, and used for
  the listing and every file; a later run that extends the shards keeps that commit (and says so when
  upstream has moved on). $HF_TOKEN is sent to the hub; 429 and 5xx answers are waited out (Retry-After).
- --hub_url (default: $TRITONGPT_HF_ENDPOINT, else $HF_ENDPOINT, else https://huggingface.co) points at a
  hub mirror.

modded-nanogpt's pre-tokenized FineWeb shards (the fineweb10B files its data/cached_fineweb10B.py fetches)
are in this same format and need no preparing: put fineweb_val_*.bin and fineweb_train_*.bin in
data/<name>/ and train with --dataset=<name>.
"""
import argparse
import itertools
import json
import multiprocessing
import multiprocessing.pool
import os
import re
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tritongpt import data  # noqa: E402
from tritongpt import hub  # noqa: E402
from tritongpt.fileio import atomic_open, download  # noqa: E402
from prepare import common  # noqa: E402

try:
    import pyarrow.parquet as pq
except ImportError:
    pq = None  # only this script needs pyarrow: main() says how to install it

DATASETS = {"fineweb_edu": "HuggingFaceFW/fineweb-edu", "fineweb": "HuggingFaceFW/fineweb"}
FOLDER = "sample/10BT"
REVISION_FILE = "hub_revision.json"  # the dataset commit the shards are made from
HUB_HINT = ", or point --hub_url (or $HF_ENDPOINT) at a reachable Hugging Face mirror"  # ends hub errors
SHARD_NAME = re.compile(r"fineweb_(val|train)_(\d{6})\.bin")


def shard_name(index: int) -> str:
    return f"fineweb_{'val' if index == 0 else 'train'}_{index:06d}.bin"


def pinned_commit(base: str, repo: str, data_dir: Path) -> str:
    """The commit of `repo` this data folder is made from: the one recorded there by the run that started
    it, else main's now (recorded). A run that extends the shards thus reads the same version of the data;
    it says so when upstream has moved on since."""
    record = data_dir / REVISION_FILE
    latest = hub.resolve_revision(base, "dataset", repo, hint=HUB_HINT)
    if record.is_file():
        try:
            recorded = json.loads(record.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise common.PrepareError(f"{record} is not JSON ({error}); delete it (and the shards beside it, which "
                                      "it dates) to start afresh") from None
        if not isinstance(recorded, dict) or not hub.is_commit(recorded.get("commit")):
            raise common.PrepareError(f"{record} does not name a commit (40 hex digits, as the hub writes it), so "
                                      "it was edited or damaged; delete it and the shards beside it to start afresh")
        if recorded.get("repo") != repo:
            raise common.PrepareError(f"{data_dir} was made from {recorded.get('repo')}, not {repo}; use another "
                                      "--data_dir, or delete that one")
        commit = recorded["commit"]
        if commit != latest:
            print(f"{repo} has changed upstream (main is now {latest}); continuing with commit {commit}, which "
                  f"the shards in {data_dir} come from (delete {record} and the shards to start afresh)")
        return commit
    with atomic_open(record) as f:
        f.write(json.dumps({"repo": repo, "commit": latest}).encode())
    return latest


def list_parquet_files(base: str, repo: str, commit: str) -> list[hub.RemoteFile]:
    """The parquet files in the repo's FOLDER at `commit`."""
    files = [f for f in hub.list_files(base, "dataset", repo, commit, FOLDER, hint=HUB_HINT)
             if f.path.endswith(".parquet")]
    if not files:
        raise common.PrepareError(f"{repo} lists no parquet files in {FOLDER} at commit {commit} on {base}")
    return sorted(files, key=lambda f: f.path)


def fetch_parquet(base: str, repo: str, commit: str, remote: hub.RemoteFile, cache_dir: Path) -> Path:
    return download(
        hub.file_url(base, "dataset", repo, commit, remote.path), cache_dir / Path(remote.path).name,
        remote.sha256, remote.size, hint=HUB_HINT, headers=hub.auth_headers(),
    )


def documents(parquet_paths: Iterable[Path], start: int) -> Iterator[str]:
    """The text of every document from number `start` on, in file and row order. Whole files before
    `start` are skipped on their row count alone, without reading them."""
    for path in parquet_paths:
        pf = pq.ParquetFile(path)
        if start >= pf.metadata.num_rows:
            start -= pf.metadata.num_rows
            continue
        if "text" not in pf.schema_arrow.names:
            raise common.PrepareError(f"{path} has no 'text' column (columns: {pf.schema_arrow.names})")
        for batch in pf.iter_batches(batch_size=1024, columns=["text"]):
            texts = ["" if text is None else text for text in batch.column(0).to_pylist()]  # a null row: no text
            yield from texts[start:]
            start = max(start - len(texts), 0)


# The tokenizer in each pool worker, set by _init_worker.
_enc = None


def _init_worker() -> None:
    global _enc
    _enc = data.gpt2_encoding()


def tokenize(text: str) -> np.ndarray:
    return np.array([common.EOT] + _enc.encode_ordinary(text), dtype=np.uint16)


def tokenized(pool: multiprocessing.pool.Pool, texts: Iterator[str], group: int) -> Iterator[np.ndarray]:
    """pool.imap(tokenize, texts) in order, with at most two groups of documents in flight. imap on
    the whole stream would read it into memory as fast as parquet decodes, far ahead of the workers;
    two groups keep the workers busy while the next group is read."""
    pending = deque()
    while batch := list(itertools.islice(texts, group)):
        pending.append(pool.imap(tokenize, batch, chunksize=16))
        if len(pending) == 2:
            yield from pending.popleft()
    while pending:
        yield from pending.popleft()


@dataclass
class Limits:
    shard_size: int
    max_tokens: int | None
    num_shards: int | None  # val + train; None: until the data runs out

    def budget(self, index: int) -> int:
        """Shard `index`'s size (0: past the end). The data may run out before, making the last one shorter."""
        if self.num_shards is not None and index >= self.num_shards:
            return 0
        if self.max_tokens is None:
            return self.shard_size
        return max(0, min(self.shard_size, self.max_tokens - index * self.shard_size))

    @property
    def total(self) -> int | None:
        caps = [] if self.max_tokens is None else [self.max_tokens]
        if self.num_shards is not None:
            caps.append(self.num_shards * self.shard_size)
        return min(caps, default=None)


def shard_tokens(path: Path) -> np.ndarray:
    return np.memmap(path, dtype=data.TOKEN_DTYPE, mode="r", offset=data.SHARD_HEADER_BYTES,
                     shape=(data.read_shard_header(path),))


def finished_shards(data_dir: Path, limits: Limits) -> list[Path]:
    """The shards from the first on that are already written with the size this run gives them."""
    done = []
    while (budget := limits.budget(len(done))) > 0:
        path = data_dir / shard_name(len(done))
        try:
            if not path.exists() or data.read_shard_header(path) != budget:
                break
        except ValueError as e:
            print(f"{path.name} is damaged and will be rewritten: {e}")
            break
        done.append(path)
    return done


def resume_point(shards: list[Path]) -> tuple[int, np.ndarray]:
    """Where the token stream continues after `shards`: the number of the document it is in the middle
    of, and that document's tokens already written. Every document starts with EOT (which
    encode_ordinary never produces), so counting EOTs counts documents."""
    docs, tail = 0, []
    for path in shards:
        tokens = shard_tokens(path)
        eots = np.flatnonzero(tokens == common.EOT)
        docs += len(eots)
        tail = [tokens[eots[-1]:]] if len(eots) else tail + [tokens]
    written = np.concatenate(tail) if tail else np.zeros(0, dtype=data.TOKEN_DTYPE)
    return max(docs - 1, 0), written


def continue_stream(chunks: Iterator[np.ndarray], written: np.ndarray, data_dir: Path) -> Iterator[np.ndarray]:
    """The tokens after `written`, checking that the first document really starts with them, which
    it does unless the shards in data_dir came from other data."""
    first = next(chunks, None)
    if first is not None:
        if not np.array_equal(first[:len(written)], written):
            raise common.PrepareError(
                f"The shards in {data_dir} do not match the documents being tokenized (a different --dataset, or "
                "shards from elsewhere?); delete them, or use another --data_dir"
            )
        yield first[len(written):]
        yield from chunks


def save_shard(path: Path, tokens: np.ndarray) -> None:
    if path.exists():
        try:
            if np.array_equal(shard_tokens(path), tokens):
                print(f"{path.name} is already complete")
                return
        except ValueError:
            pass  # a broken file: overwritten below
    data.write_shard(path, tokens)


def write_shards(stream: Iterable[np.ndarray], limits: Limits, first: int, data_dir: Path) -> int:
    """Fill shards `first`, `first`+1, ... from the stream, each with its budget of tokens, the last
    one less if the stream runs out. Returns the number of shards in the dataset."""
    index, filled = first, 0
    buffer = np.empty(limits.shard_size, dtype=data.TOKEN_DTYPE)
    initial = sum(limits.budget(i) for i in range(first))
    with tqdm(total=limits.total, initial=initial, unit="tok", unit_scale=True, desc="tokenizing") as bar:
        for tokens in stream:
            while len(tokens):
                budget = limits.budget(index)
                if budget == 0:
                    return index
                take = min(budget - filled, len(tokens))
                buffer[filled:filled + take] = tokens[:take]
                filled, tokens = filled + take, tokens[take:]
                bar.update(take)
                if filled == budget:
                    save_shard(data_dir / shard_name(index), buffer[:filled])
                    index, filled = index + 1, 0
    if filled:
        save_shard(data_dir / shard_name(index), buffer[:filled])
        index += 1
    return index


def check_no_stale_shards(data_dir: Path, num_shards: int) -> None:
    stale = sorted(p.name for p in data_dir.glob("fineweb_*.bin")
                   if (m := SHARD_NAME.fullmatch(p.name)) and int(m.group(2)) >= num_shards)
    if stale:
        raise common.PrepareError(
            f"{data_dir} now holds {num_shards} shards, but also {', '.join(stale)}, left from an earlier, larger "
            "run; training would read them too. Delete them, or re-run with the earlier --max_tokens/--shards"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=list(DATASETS), default="fineweb_edu")
    common.add_data_dir_arg(parser, "<dataset>")
    parser.add_argument("--shard_size", type=int, default=100_000_000, help="tokens per shard")
    parser.add_argument("--max_tokens", type=int, default=None, help="stop after this many tokens (all shards)")
    parser.add_argument("--shards", type=int, default=None, help="stop after this many train shards (plus val)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer processes")
    parser.add_argument("--hub_url", default=hub.endpoint(), help="Hugging Face hub or mirror (default: "
                        f"${hub.ENDPOINT_ENV}, else $HF_ENDPOINT, else {hub.DEFAULT_ENDPOINT})")
    args = parser.parse_args(argv)
    if pq is None:
        raise common.PrepareError("prepare/fineweb.py reads parquet files with pyarrow: pip install pyarrow")
    if not 0 < args.shard_size <= data.MAX_SHARD_TOKENS:
        raise common.PrepareError(f"--shard_size must be between 1 and {data.MAX_SHARD_TOKENS:,}")
    for flag, value in [("--max_tokens", args.max_tokens), ("--shards", args.shards), ("--workers", args.workers)]:
        if value is not None and value < 1:
            raise common.PrepareError(f"{flag} must be at least 1, got {value}")
    data_dir = common.data_dir_for(args.data_dir, args.dataset)
    repo, hub_url = DATASETS[args.dataset], args.hub_url.rstrip("/")

    limits = Limits(args.shard_size, args.max_tokens, None if args.shards is None else args.shards + 1)
    done = finished_shards(data_dir, limits)
    if done:
        print(f"keeping the {len(done)} shard(s) already written, {done[0].name} to {done[-1].name}")
    num_shards = len(done)
    if limits.budget(num_shards) > 0:
        commit = pinned_commit(hub_url, repo, data_dir)
        remote_files = list_parquet_files(hub_url, repo, commit)
        print(f"{repo}/{FOLDER} at commit {commit}: {len(remote_files)} parquet files, "
              f"{sum(f.size for f in remote_files) / 1e9:.1f} GB")
        data.gpt2_encoding()  # fail here, with a clear message, rather than in every worker
        start_doc, written = resume_point(done)
        paths = (fetch_parquet(hub_url, repo, commit, f, data_dir / "parquet") for f in remote_files)
        with multiprocessing.Pool(args.workers, initializer=_init_worker) as pool:
            chunks = tokenized(pool, documents(paths, start_doc), group=64 * args.workers)
            num_shards = write_shards(continue_stream(chunks, written, data_dir), limits, len(done), data_dir)
    if num_shards < 2:
        raise common.PrepareError(f"the data filled only {num_shards} shard(s), and training needs a val shard and a "
                                  "train shard; use a smaller --shard_size")
    check_no_stale_shards(data_dir, num_shards)
    tokens = sum(data.read_shard_header(data_dir / shard_name(i)) for i in range(num_shards))
    print(f"{data_dir}: {shard_name(0)} and {num_shards - 1} train shard(s), {tokens:,} tokens")

if __name__ == "__main__":
    common.run(main)
