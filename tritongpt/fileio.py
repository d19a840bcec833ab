"""Files: torch.save files read without running code, atomic writes, and verified, resumable downloads.

It imports nothing of the project but configurator's UserError, so that the model's Hugging Face I/O,
the data loader and the prepare scripts share one way to write a file and one way to fetch one.
"""
import email.utils
import errno
import hashlib
import os
import pickle
import re
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

import requests
import torch
from tqdm import tqdm

from tritongpt.configurator import UserError


class DownloadError(UserError, RuntimeError):
    """A download that failed in a way the user can fix; scripts print its message without a traceback."""


class _Retryable(Exception):
    """A request failed in a way that trying again may fix; retry_after is how long the server asked us to
    wait (seconds), when it said."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


# How long all the waits of one request may add up to: the hub's rate limits reset within 5 minutes.
MAX_TOTAL_WAIT = 600.0


def retry_after(response: requests.Response) -> float | None:
    """Seconds the server asks a client to wait: Retry-After (seconds or an HTTP date), else the reset of the
    IETF RateLimit header the Hugging Face hub sends ('"api";r=0;t=42'), else None."""
    value = response.headers.get("Retry-After", "").strip()
    if value:
        if value.isdigit():
            return float(value)
        try:
            return max(0.0, (email.utils.parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
        except (TypeError, ValueError):
            pass
    match = re.search(r"\bt=(\d+)", response.headers.get("RateLimit", ""))
    return float(match.group(1)) if match else None


def check_status(response: requests.Response) -> None:
    """_Retryable for the answers worth waiting out (408, 429, 5xx), with the wait the server asked for."""
    if response.status_code in (408, 429) or response.status_code >= 500:
        raise _Retryable(f"HTTP {response.status_code} {response.reason}", retry_after(response))


class Retrier:
    """One retry policy for every request of a download or hub call: wait as long as the server asks
    (Retry-After) or back off exponentially, say what is being waited for, give up after `retries` failures
    in a row without progress or MAX_TOTAL_WAIT seconds of waiting in all."""

    def __init__(self, url: str, retries: int = 5, backoff: float = 1.0, action: str = "get"):
        self.url, self.retries, self.backoff, self.action = url, retries, backoff, action
        self.failures = 0
        self.waited = 0.0

    def wait(self, error: Exception, progress: bool = False) -> None:
        """After a failed attempt: sleep before the next one, or raise DownloadError when it is time to stop."""
        self.failures = 0 if progress else self.failures + 1
        asked = getattr(error, "retry_after", None)
        if asked is not None:
            wait, why = asked, "as the server asks (Retry-After)"
        else:
            wait, why = (min(self.backoff * 2 ** (self.failures - 1), 60.0) if self.failures else 0.0), "then retrying"
        too_long = self.waited + wait > MAX_TOTAL_WAIT
        if self.failures >= self.retries or too_long:
            why = (f"waiting {wait:.0f}s more would pass the {MAX_TOTAL_WAIT:.0f}s this waits in all" if too_long
                   else f"{self.failures} failed attempts in a row")
            raise DownloadError(f"Could not {self.action} {self.url} ({why}; last error: {error}).\nCheck your "
                                "internet connection (or rate limit) and run this again (downloads resume)")
        print(f"{self.url}: {error}; waiting {wait:.0f}s {why}", file=sys.stderr)
        time.sleep(wait)
        self.waited += wait


def get(url: str, headers: dict | None = None, timeout: float = 30.0, retries: int = 5, backoff: float = 1.0,
        hint: str = "") -> requests.Response:
    """A GET answered 200 (a listing, metadata), through the retry policy; other answers are DownloadErrors."""
    retrier = Retrier(url, retries, backoff)
    while True:
        try:
            response = requests.get(url, headers=headers, timeout=timeout)
            check_status(response)
            break
        except (requests.ConnectionError, requests.Timeout, _Retryable) as e:
            try:
                retrier.wait(e)
            except DownloadError as error:
                raise DownloadError(f"{error}{hint}") from e
    if response.status_code != 200:
        raise DownloadError(f"{url} answered HTTP {response.status_code} {response.reason}{hint}")
    return response


# -----------------------------------------------------------------------------
# Reading torch.save files safely


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def load_file(path: str | Path, fix: str = "delete it and resume from another checkpoint, or train again") -> dict:
    """torch.load with weights_only=True: tensors, numbers, strings, lists and dicts only, so nothing in
    the file can run code. A file that needs more, or is truncated or corrupt, is a CheckpointError whose
    message ends with `fix`."""
    path = Path(path)
    try:
        state = _torch_load(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except pickle.UnpicklingError as error:
        detail = next((line for line in str(error).splitlines() if "Unsupported global" in line), None)
        if detail is None:  # not an object it refused: bytes that are no pickle at all
            raise CheckpointError(f"{path} is truncated or corrupt (not a torch.save file); {fix}") from None
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors, numbers, strings, lists and dicts "
            f"({detail.strip()}), and unpickling those could run code. Only load checkpoints you trust; "
            "tritongpt and nanoGPT checkpoints never need this"
        ) from None
    except Exception as error:  # unpickling damaged bytes fails with almost any exception type
        first_line = next(iter(str(error).splitlines()), "")
        raise CheckpointError(f"{path} is truncated or corrupt ({type(error).__name__}: {first_line}); {fix}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a checkpoint: it holds a {type(state).__name__}, not a dict")
    return state


def _torch_load(path: Path) -> object:
    """Memory-mapped where the file allows (torch.save's zip format, nanoGPT's included): tensors are read
    when used, so finding the newest checkpoint reads only iter_num, not a few GB of optimizer state."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # the legacy (pre-zip) format


# -----------------------------------------------------------------------------
# Writing


class DiskFullError(UserError, OSError):
    """A write that ran out of space; the message names the file, what it needed and what is free."""


class _WriteRecorder:
    """A file that remembers the OSError of a failed write: torch.save reports a full disk as a RuntimeError
    about stream positions, and this is how atomic_open still knows that the disk was full."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def __getattr__(self, name: str):
        return getattr(self.file, name)


def _host() -> str:
    """This machine's name as it goes into temp-file names (letters, digits and dashes only)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


# .<name>.<pid>.<8 hex>.<host>.tmp; versions before the host was added wrote .<name>.<pid>.<8 hex>.tmp
TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}(\.(?P<host>[A-Za-z0-9-]+))?\.tmp")


@contextmanager
def atomic_open(path: str | Path, size_hint: int | None = None) -> Iterator[BinaryIO]:
    """Open a temp file next to `path` for binary writing; it replaces `path` only once the block
    finishes without error, so a crash or Ctrl-C never leaves a half-written file under the real name.
    The temp name ends in .tmp, so the loader's *.bin globs never pick it up, and holds this machine's name
    and process id, so a later run can tell a dead process's leftovers (remove_stale_temp_files). A full
    disk is a DiskFullError naming the file and `size_hint`, the bytes it was expected to need."""
    path = Path(path)
    # Not tempfile.mkstemp: its files are private (0600); this one gets the usual umask permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{_host()}.tmp")
    recorder = None
    try:
        with open(tmp, "xb") as f:
            recorder = _WriteRecorder(f)
            yield recorder
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        causes = (error, recorder.error if recorder is not None else None)
        if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in causes):
            raise DiskFullError(errno.ENOSPC, disk_full_message(path, written, size_hint)) from error
        raise


def disk_full_message(path: Path, written: int, size_hint: int | None) -> str:
    free = shutil.disk_usage(path.parent).free
    needed = f" of the about {size_hint:,} it needs" if size_hint else ""
    return (f"no space left on the device holding {path.parent}: writing {path.name} stopped after {written:,} "
            f"bytes{needed} ({free:,} bytes are free there now). Nothing was replaced: an earlier {path.name} is "
            "still whole. Free some space, or write elsewhere, and run again")


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete the temp files atomic_open left in `directory` when its process died (kill -9, a crash, a
    power cut), and return them. Only files of this machine whose process is gone: another node's, or a
    running process's, may still be written."""
    removed = []
    directory = Path(directory)
    for path in directory.glob(".*.tmp") if directory.is_dir() else []:
        match = TEMP_NAME.fullmatch(path.name)
        if match is None or match["host"] not in (None, _host()) or _process_alive(int(match["pid"])):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: asks whether the process exists, sends nothing
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


def writable_directory(directory: str | Path, key: str) -> Path:
    """Create `directory` if needed and check that files can be written there; a UserError naming `key` (the
    setting it came from) otherwise."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_open(directory / ".write_check"):
            pass
        (directory / ".write_check").unlink()
    except FileExistsError:
        raise UserError(f"{key}={str(directory)!r} is a file, not a directory; choose another {key}") from None
    except DiskFullError:
        raise
    except OSError as error:
        raise UserError(f"cannot write to {key}={str(directory)!r} ({error.strerror}); choose a directory you can "
                        f"write to with --{key}=...") from None
    return directory


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
        check_status(r)
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
             hint: str = "", headers: dict | None = None) -> Path:
    """Download `url` to `dest`, verified, unless dest is already there (then it is only verified).

    Bytes stream into dest + ".part", which a later attempt or run continues with an HTTP Range
    request (or verifies without a request when it already has `size` bytes). Failed attempts go through
    the Retrier: the wait a server asks for, else exponential backoff; an attempt that got some bytes
    resets the count, so a slow flaky connection still finishes. dest appears only after the size
    and sha256 (when given) match, so its existence means it is good. `hint` ends every error message
    with the caller's other ways to get the file (", or set X to a mirror"). `headers` go with the
    request (an Authorization header is dropped by requests when a redirect leaves the host).
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
    session.headers.update({"User-Agent": "tritongpt-prepare", "Accept-Encoding": "identity", **(headers or {})})
    retrier = Retrier(url, retries, backoff, action="download")
    while not (size is not None and part.exists() and part.stat().st_size == size):
        before = part.stat().st_size if part.exists() else 0
        try:
            _attempt(session, url, part, timeout, chunk_size, dest.name)
            break
        except DownloadError as e:
            raise DownloadError(f"{e}; check the URL, or {by_hand}{hint}") from e
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, _Retryable) as e:
            try:
                retrier.wait(e, progress=part.exists() and part.stat().st_size > before)
            except DownloadError as error:
                raise DownloadError(f"{error}, or {by_hand}{hint}") from e
    if not part.exists():
        raise DownloadError(f"{url} sent nothing; {by_hand}{hint}")
    problem = file_problem(part, sha256, size)
    if problem:
        part.unlink()
        raise DownloadError(f"Download of {url} is corrupt: {problem}. The partial file was deleted; run this "
                           f"again to download it afresh, or {by_hand}{hint}")
    os.replace(part, dest)
    return dest
