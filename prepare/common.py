"""What the prepare scripts share: downloading, the offline mirror, tokenizers, CLI plumbing."""
import argparse
import hashlib
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import requests
import tiktoken
from tqdm import tqdm

import data

MIRROR_ENV = "TRITONGPT_MIRROR"
EOT = 50256  # GPT-2's <|endoftext|>
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_MIRROR_PATH = "tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINYSHAKESPEARE_SIZE = 1_115_394


class PrepareError(RuntimeError):
    """A problem the user can fix; the scripts print its message without a traceback."""


class _Retryable(Exception):
    """A download attempt failed in a way that trying again may fix."""


def run(main: Callable[[list[str] | None], None]) -> None:
    try:
        main(None)
    except PrepareError as e:
        sys.exit(f"error: {e}")


def add_data_dir_arg(parser: argparse.ArgumentParser, default_name: str) -> None:
    parser.add_argument("--data_dir", type=Path, default=None,
                        help=f"output directory (default: data/{default_name}, relative to the current directory, "
                             "where train.py looks for it)")


def data_dir_for(arg: Path | None, name: str) -> Path:
    data_dir = arg if arg is not None else Path("data") / name
    data_dir.mkdir(parents=True, exist_ok=True)
    return data_dir


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _mismatch(path: Path, sha256: str | None, size: int | None) -> str | None:
    """What is wrong with `path` given the expected sha256 and size, or None when it matches."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"it has {actual_size:,} bytes, expected {size:,}"
    if sha256 is not None and (actual := file_sha256(path)) != sha256.lower():
        return f"its sha256 is {actual}, expected {sha256.lower()}"
    return None


def _check_existing(dest: Path, sha256: str | None, size: int | None) -> bool:
    """True when dest is already there and correct; an error when it is there but wrong."""
    if not dest.exists():
        return False
    problem = _mismatch(dest, sha256, size)
    if problem:
        raise PrepareError(f"{dest} already exists but {problem}; delete it and run this again")
    return True


def _content_range_start(response: requests.Response) -> int | None:
    """The first byte of a 206 response ("bytes START-END/TOTAL"), None if unparseable."""
    value = response.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _attempt(session: requests.Session, url: str, part: Path, timeout: float, chunk_size: int, desc: str) -> None:
    """One GET of `url` into `part`, continuing from its current size with a Range request."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with session.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416:
            # The server has nothing past `offset`: the partial file is complete, or longer than the
            # remote file (changed upstream). Verification tells which; a wrong file is deleted there.
            return
        if r.status_code in (408, 429) or r.status_code >= 500:
            raise _Retryable(f"HTTP {r.status_code} {r.reason}")
        if r.status_code not in (200, 206):
            raise PrepareError(f"{url} answered HTTP {r.status_code} {r.reason}")
        if r.status_code == 206 and _content_range_start(r) != offset:
            part.unlink()
            raise _Retryable(f"the server resumed at the wrong offset ({r.headers.get('Content-Range')})")
        if r.status_code == 200:
            offset = 0  # the server ignored Range: start over
        length = r.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        received = 0
        with open(part, "ab" if offset else "wb") as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=desc
        ) as bar:
            for chunk in r.iter_content(chunk_size):
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if length is not None and received != int(length):
            raise _Retryable(f"connection closed after {received:,} of {int(length):,} bytes")


def download(url: str, dest: str | Path, sha256: str | None = None, size: int | None = None, *,
             timeout: float = 30.0, retries: int = 5, backoff: float = 1.0, chunk_size: int = 1 << 20,
             hint: str = "") -> Path:
    """Download `url` to `dest`, verified, unless dest is already there (then it is only verified).

    Bytes stream into dest + ".part", which a later attempt or run continues with an HTTP Range
    request. Failed attempts are retried with exponential backoff; an attempt that got some bytes
    resets the count, so a slow flaky connection still finishes. dest appears only after the size
    and sha256 (when given) match, so its existence means it is good. `hint` ends every error message
    with the caller's other ways to get the file (", or set X to a mirror").
    """
    dest = Path(dest)
    if _check_existing(dest, sha256, size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if size is not None and part.exists() and part.stat().st_size > size:
        part.unlink()  # longer than the file can be: left from a different file, start over
    by_hand = f"download {url} by hand to {dest}"
    session = requests.Session()
    # Compressed transfer would make byte offsets for Range differ from offsets in the file.
    session.headers.update({"User-Agent": "tritongpt-prepare", "Accept-Encoding": "identity"})
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            _attempt(session, url, part, timeout, chunk_size, dest.name)
            break
        except PrepareError as e:
            raise PrepareError(f"{e}; check the URL, or {by_hand}{hint}") from e
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, _Retryable) as e:
            got_bytes = part.exists() and part.stat().st_size > before
            failures = 0 if got_bytes else failures + 1
            if failures >= retries:
                raise PrepareError(
                    f"Could not download {url} ({failures} attempts; last error: {e}).\n"
                    f"Check your internet connection and run this again (it resumes), or {by_hand}{hint}"
                ) from e
            wait = min(backoff * 2 ** (failures - 1), 60.0) if failures else 0.0
            print(f"download of {url} failed ({e}); retrying in {wait:.0f}s", file=sys.stderr)
            time.sleep(wait)
    if not part.exists():
        raise PrepareError(f"{url} sent nothing; {by_hand}{hint}")
    problem = _mismatch(part, sha256, size)
    if problem:
        part.unlink()
        raise PrepareError(f"Download of {url} is corrupt: {problem}. The partial file was deleted; run this "
                           f"again to download it afresh, or {by_hand}{hint}")
    os.replace(part, dest)
    return dest


def fetch(url: str, dest: str | Path, mirror_path: str, sha256: str | None = None, size: int | None = None) -> Path:
    """`download`, except that with $TRITONGPT_MIRROR set the file comes from $TRITONGPT_MIRROR/<mirror_path>,
    a directory (copied) or a base URL (downloaded), for machines without internet access."""
    dest = Path(dest)
    mirror = os.environ.get(MIRROR_ENV, "")
    hint = f", or set {MIRROR_ENV} to a directory or base URL that holds {mirror_path}"
    if not mirror:
        return download(url, dest, sha256, size, hint=hint)
    if mirror.startswith(("http://", "https://")):
        return download(f"{mirror.rstrip('/')}/{mirror_path}", dest, sha256, size,
                        hint=f", or unset {MIRROR_ENV}={mirror} to use {url}")
    if _check_existing(dest, sha256, size):
        return dest
    source = Path(mirror) / mirror_path
    if not source.is_file():
        raise PrepareError(f"{MIRROR_ENV}={mirror} has no {mirror_path}; put the file there, "
                           f"or unset {MIRROR_ENV} to download {url}")
    problem = _mismatch(source, sha256, size)
    if problem:
        raise PrepareError(f"{source} (from {MIRROR_ENV}) is not the expected file: {problem}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as src, data.atomic_open(dest) as out:
        shutil.copyfileobj(src, out)
    return dest


def fetch_tinyshakespeare(data_dir: Path) -> str:
    """The tiny Shakespeare text, read the way nanoGPT reads it (text mode, universal newlines)."""
    path = fetch(TINYSHAKESPEARE_URL, data_dir / "input.txt", TINYSHAKESPEARE_MIRROR_PATH,
                 TINYSHAKESPEARE_SHA256, TINYSHAKESPEARE_SIZE)
    with open(path, encoding="utf-8") as f:
        return f.read()


def gpt2_encoding():
    """tiktoken's GPT-2 BPE. tiktoken downloads its vocabulary files once and caches them."""
    try:
        return tiktoken.get_encoding("gpt2")
    except (requests.RequestException, OSError) as e:
        raise PrepareError(
            f"Could not load the GPT-2 tokenizer ({type(e).__name__}: {e}). tiktoken downloads its vocabulary "
            "files from openaipublic.blob.core.windows.net on first use: check your internet connection, or "
            "set TIKTOKEN_CACHE_DIR to a directory holding tiktoken's cached GPT-2 files"
        ) from e


def char_meta(text: str) -> dict:
    """nanoGPT's char vocabulary for `text`: the sorted distinct characters, keys in nanoGPT's order
    so that meta.pkl pickles to the same bytes."""
    chars = sorted(set(text))
    if len(chars) > data.MAX_TOKEN_ID + 1:
        raise PrepareError(f"the text has {len(chars):,} distinct characters, more than the {data.MAX_TOKEN_ID + 1:,} "
                           "ids uint16 tokens can hold; use the gpt2 tokenizer instead")
    return {
        "vocab_size": len(chars),
        "itos": {i: ch for i, ch in enumerate(chars)},
        "stoi": {ch: i for i, ch in enumerate(chars)},
    }


def char_ids(text: str, meta: dict) -> np.ndarray:
    """`text` as ids in the char vocabulary `meta`; numpy, since a Python loop over a large corpus crawls."""
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    # stoi's keys are sorted, so an id is the position of the character's code point among them.
    alphabet = np.array([ord(ch) for ch in meta["stoi"]], dtype=np.uint32)
    return np.searchsorted(alphabet, codepoints).astype(np.uint16)


def write_splits(data_dir: Path, train_ids, val_ids, meta: dict | None = None) -> None:
    """train.bin, val.bin and meta.pkl (char vocabularies only) in nanoGPT's format. Without a meta,
    an old meta.pkl goes: left behind, it would make train.py and sample.py use the wrong vocabulary."""
    data.write_tokens(data_dir / "train.bin", train_ids)
    data.write_tokens(data_dir / "val.bin", val_ids)
    if meta is not None:
        data.write_meta(data_dir / "meta.pkl", meta)
    elif (data_dir / "meta.pkl").exists():
        (data_dir / "meta.pkl").unlink()
        print(f"removed the old {data_dir / 'meta.pkl'}: this dataset uses GPT-2 BPE, not a char vocabulary")
    written = ["train.bin", "val.bin"] + (["meta.pkl"] if meta is not None else [])
    print(f"wrote {', '.join(written)} to {data_dir}")
