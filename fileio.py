"""Files: atomic writes and verified, resumable downloads.

A leaf module (it imports nothing of the project), so that the model's Hugging Face I/O, the data
loader and the prepare scripts share one way to write a file and one way to fetch one.
"""
import hashlib
import os
import secrets
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import requests
from tqdm import tqdm


class DownloadError(RuntimeError):
    """A download that failed in a way the user can fix; scripts print its message without a traceback."""


class _Retryable(Exception):
    """A download attempt failed in a way that trying again may fix."""


@contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """Open a temp file next to `path` for binary writing; it replaces `path` only once the block
    finishes without error, so a crash or Ctrl-C never leaves a half-written file under the real name.
    The temp name ends in .tmp, so the loader's *.bin globs never pick it up."""
    path = Path(path)
    # Not tempfile.mkstemp: its files are private (0600); this one gets the usual umask permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_problem(path: Path, sha256: str | None, size: int | None) -> str | None:
    """What is wrong with `path` given the expected sha256 and size, or None when it matches."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"it has {actual_size:,} bytes, expected {size:,}"
    if sha256 is not None and (actual := file_sha256(path)) != sha256.lower():
        return f"its sha256 is {actual}, expected {sha256.lower()}"
    return None


def check_existing(dest: Path, sha256: str | None, size: int | None) -> bool:
    """True when dest is already there and correct; an error when it is there but wrong."""
    if not dest.exists():
        return False
    problem = file_problem(dest, sha256, size)
    if problem:
        raise DownloadError(f"{dest} already exists but {problem}; delete it and run this again")
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
            raise DownloadError(f"{url} answered HTTP {r.status_code} {r.reason}")
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
    if check_existing(dest, sha256, size):
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
        except DownloadError as e:
            raise DownloadError(f"{e}; check the URL, or {by_hand}{hint}") from e
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, _Retryable) as e:
            got_bytes = part.exists() and part.stat().st_size > before
            failures = 0 if got_bytes else failures + 1
            if failures >= retries:
                raise DownloadError(
                    f"Could not download {url} ({failures} attempts; last error: {e}).\n"
                    f"Check your internet connection and run this again (it resumes), or {by_hand}{hint}"
                ) from e
            wait = min(backoff * 2 ** (failures - 1), 60.0) if failures else 0.0
            print(f"download of {url} failed ({e}); retrying in {wait:.0f}s", file=sys.stderr)
            time.sleep(wait)
    if not part.exists():
        raise DownloadError(f"{url} sent nothing; {by_hand}{hint}")
    problem = file_problem(part, sha256, size)
    if problem:
        part.unlink()
        raise DownloadError(f"Download of {url} is corrupt: {problem}. The partial file was deleted; run this "
                           f"again to download it afresh, or {by_hand}{hint}")
    os.replace(part, dest)
    return dest
