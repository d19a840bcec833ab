"""prepare/: downloads against a local HTTP server, and the dataset scripts run as real subprocesses."""
import email.utils
import hashlib
import io
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests

from tritongpt import data
from tritongpt import fileio
from prepare import common

REPO = Path(__file__).resolve().parent.parent
MIRROR = Path(os.environ.get(common.MIRROR_ENV, "/nonexistent"))
SHAKESPEARE = MIRROR / "tinyshakespeare" / "input.txt"
needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="needs the offline tinyshakespeare copy")


class LocalServer:
    """A static file server on 127.0.0.1 with HTTP Range support and switches for failure modes."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.drop_after: dict[str, int] = {}  # path -> bytes sent before the first response is cut off
        self.fail_once: dict[str, int] = {}  # path -> HTTP status answered to the first request
        self.ignore_range = False
        self.headers: dict[str, dict[str, str]] = {}  # path -> extra response headers
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        state = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                state.requests.append((self.path, self.headers.get("Range")))
                body = state.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                if self.path in state.fail_once:
                    self.send_error(state.fail_once.pop(self.path))
                    return
                start = 0
                range_header = self.headers.get("Range")
                if range_header and not state.ignore_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                for name, value in state.headers.get(self.path, {}).items():
                    self.send_header(name, value)
                self.end_headers()
                # HTTP/1.0: the connection closes after this, so a short write reaches the client as a cut.
                self.wfile.write(body[start:start + state.drop_after.pop(self.path, len(body))])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = LocalServer()
    yield s
    s.close()


@pytest.fixture
def no_sleep(monkeypatch):
    """Retries back off with time.sleep; record the waits instead of waiting."""
    waits = []
    monkeypatch.setattr(fileio.time, "sleep", waits.append)
    return waits


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/input.txt"


def run_script(name: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run prepare/<name>.py as a user would, from `cwd`."""
    return subprocess.run([sys.executable, str(REPO / "prepare" / f"{name}.py"), *args], cwd=cwd,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# --- download ---

def test_download_full_file(server, tmp_path):
    body = os.urandom(300_000)
    server.files["/a/file.bin"] = body
    dest = fileio.download(server.url + "/a/file.bin", tmp_path / "sub" / "file.bin", sha(body), len(body))
    assert dest.read_bytes() == body
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.bin"]
    # Already there and verified: no second request.
    fileio.download(server.url + "/a/file.bin", dest, sha(body), len(body))
    assert len(server.requests) == 1


def test_download_resumes_a_cut_connection(server, tmp_path, no_sleep):
    body = os.urandom(1_000_000)
    server.files["/big.bin"] = body
    server.drop_after["/big.bin"] = 300_000
    dest = fileio.download(server.url + "/big.bin", tmp_path / "big.bin", sha(body), len(body), chunk_size=8192)
    assert dest.read_bytes() == body
    (_, first), (_, second) = server.requests
    assert first is None
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", second).group(1))
    assert 0 < resumed_at <= 300_000
    assert not (tmp_path / "big.bin.part").exists()


def test_download_resumes_a_part_file_from_an_earlier_run(server, tmp_path):
    body = os.urandom(50_000)
    server.files["/f"] = body
    (tmp_path / "f.part").write_bytes(body[:12_345])
    assert fileio.download(server.url + "/f", tmp_path / "f", sha(body)).read_bytes() == body
    assert server.requests == [("/f", "bytes=12345-")]


def test_download_restarts_when_the_server_ignores_range(server, tmp_path):
    body = os.urandom(50_000)
    server.files["/f"] = body
    server.ignore_range = True
    (tmp_path / "f.part").write_bytes(b"x" * 20_000)
    assert fileio.download(server.url + "/f", tmp_path / "f", sha(body)).read_bytes() == body


def test_download_retries_server_errors_with_backoff(server, tmp_path, no_sleep):
    server.files["/f"] = b"hello"
    server.fail_once["/f"] = 503
    assert fileio.download(server.url + "/f", tmp_path / "f", backoff=2.0).read_bytes() == b"hello"
    assert no_sleep == [2.0]


def test_download_corrupt_file_is_caught_and_deleted(server, tmp_path):
    server.files["/f"] = b"not what we wanted"
    with pytest.raises(fileio.DownloadError, match=r"corrupt: its sha256 is [0-9a-f]{64}, expected 0{64}"):
        fileio.download(server.url + "/f", tmp_path / "f", "0" * 64)
    with pytest.raises(fileio.DownloadError, match="it has 18 bytes, expected 17"):
        fileio.download(server.url + "/f", tmp_path / "f", size=17)
    assert list(tmp_path.iterdir()) == []


def test_download_http_error_is_not_retried(server, tmp_path):
    with pytest.raises(fileio.DownloadError, match=r"HTTP 404.*by hand to"):
        fileio.download(server.url + "/missing", tmp_path / "f")
    assert len(server.requests) == 1


def test_a_complete_part_file_is_verified_without_a_request(server, tmp_path):
    body = os.urandom(5000)
    server.files["/f.bin"] = body
    (tmp_path / "f.bin.part").write_bytes(body)  # a run killed after the last byte, before the rename
    assert fileio.download(server.url + "/f.bin", tmp_path / "f.bin", sha(body), len(body)).read_bytes() == body
    assert server.requests == []


def test_retry_after_forms():
    response = requests.Response()
    response.headers["Retry-After"] = "17"
    assert fileio.retry_after(response) == 17.0
    response.headers["Retry-After"] = email.utils.format_datetime(datetime.now(timezone.utc) + timedelta(seconds=90),
                                                                  usegmt=True)
    assert 80 <= fileio.retry_after(response) <= 90
    response.headers["Retry-After"] = email.utils.format_datetime(datetime(2000, 1, 1, tzinfo=timezone.utc), usegmt=True)
    assert fileio.retry_after(response) == 0.0  # a date in the past: go ahead
    del response.headers["Retry-After"]
    response.headers["RateLimit"] = '"api";r=0;t=42'  # the hub's header (IETF draft), when it sends no Retry-After
    assert fileio.retry_after(response) == 42.0
    del response.headers["RateLimit"]
    assert fileio.retry_after(response) is None


def test_corrupt_tokenizer_download_names_the_cache_to_clear(tmp_path):
    """tiktoken raises ValueError when the files it downloads fail its sha256 check (a broken download, a
    proxy rewriting it): the scripts say which cache directory to delete, in one line."""
    code = ("import tiktoken.load\n"
            "tiktoken.load.read_file = lambda path: b'<html>captive portal</html>'\n"
            "from tritongpt import data\n"
            "data.gpt2_encoding()\n")
    cache = tmp_path / "tiktoken_cache"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TIKTOKEN_CACHE_DIR": str(cache)})
    assert result.returncode != 0
    assert "TokenizerError: The GPT-2 tokenizer files tiktoken got are corrupt" in result.stderr
    assert f"Delete tiktoken's cache directory {cache}" in result.stderr


def test_existing_file_is_verified_not_downloaded(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    # The URL is unreachable, so any download attempt would fail.
    assert fileio.download(closed_port_url(), tmp_path / "f", sha(b"abc"), 3) == tmp_path / "f"
    with pytest.raises(fileio.DownloadError, match=r"already exists but its sha256 is .*delete it"):
        fileio.download(closed_port_url(), tmp_path / "f", sha(b"abd"))


def test_offline_error_says_what_to_do(tmp_path, monkeypatch, no_sleep):
    monkeypatch.delenv(common.MIRROR_ENV, raising=False)
    dest = tmp_path / "input.txt"
    with pytest.raises(fileio.DownloadError) as e:
        common.fetch(closed_port_url(), dest, "tinyshakespeare/input.txt")
    message = str(e.value)
    assert "Could not download" in message and "5 failed attempts in a row" in message
    assert "Check your internet connection" in message
    assert f"by hand to {dest}" in message
    assert "set TRITONGPT_MIRROR to a directory or base URL that holds tinyshakespeare/input.txt" in message
    assert no_sleep == [1.0, 2.0, 4.0, 8.0]
    assert not dest.exists()


# --- mirror ---

def test_mirror_directory(tmp_path, monkeypatch):
    (tmp_path / "mirror" / "x").mkdir(parents=True)
    (tmp_path / "mirror" / "x" / "f.txt").write_bytes(b"mirrored")
    monkeypatch.setenv(common.MIRROR_ENV, str(tmp_path / "mirror"))
    dest = common.fetch(closed_port_url(), tmp_path / "out" / "f.txt", "x/f.txt", sha(b"mirrored"))
    assert dest.read_bytes() == b"mirrored"
    with pytest.raises(common.PrepareError, match=r"has no x/other\.txt"):
        common.fetch(closed_port_url(), tmp_path / "out" / "other.txt", "x/other.txt")
    with pytest.raises(common.PrepareError, match="not the expected file"):
        common.fetch(closed_port_url(), tmp_path / "out" / "g.txt", "x/f.txt", sha(b"other"))


def test_mirror_url(server, tmp_path, monkeypatch):
    server.files["/base/x/f.txt"] = b"from the mirror"
    monkeypatch.setenv(common.MIRROR_ENV, server.url + "/base/")
    dest = common.fetch(closed_port_url(), tmp_path / "f.txt", "x/f.txt", sha(b"from the mirror"))
    assert dest.read_bytes() == b"from the mirror"
    assert server.requests == [("/base/x/f.txt", None)]


# --- shakespeare_char ---

def nanogpt_char_recipe(text: str) -> tuple[bytes, bytes, bytes]:
    """train.bin, val.bin and meta.pkl as nanoGPT's data/shakespeare_char/prepare.py makes them."""
    chars = sorted(list(set(text)))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    n = len(text)
    train = np.array([stoi[c] for c in text[:int(n * 0.9)]], dtype=np.uint16)
    val = np.array([stoi[c] for c in text[int(n * 0.9):]], dtype=np.uint16)
    meta = io.BytesIO()
    pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, meta)
    return train.tobytes(), val.tobytes(), meta.getvalue()


@needs_shakespeare
def test_shakespeare_char_is_byte_identical_to_nanogpt(tmp_path):
    result = run_script("shakespeare_char", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "data" / "shakespeare_char"
    text = SHAKESPEARE.read_text(encoding="utf-8")
    train, val, meta = nanogpt_char_recipe(text)
    assert (out / "train.bin").read_bytes() == train
    assert (out / "val.bin").read_bytes() == val
    assert (out / "meta.pkl").read_bytes() == meta
    assert data.load_meta(out) == pickle.loads(meta)  # meta.json, which is read first, agrees
    assert (out / "input.txt").read_bytes() == SHAKESPEARE.read_bytes()
    assert len(train) // 2 == 1_003_854 and len(val) // 2 == 111_540
    for line in ["length of dataset in characters: 1,115,394", "vocab size: 65",
                 "train has 1,003,854 tokens", "val has 111,540 tokens"]:
        assert line in result.stdout
    # The files decode back to the text through meta.pkl.
    itos = pickle.loads(meta)["itos"]
    decoded = "".join(itos[i] for i in np.fromfile(out / "train.bin", dtype=np.uint16).tolist())
    assert decoded + "".join(itos[i] for i in np.fromfile(out / "val.bin", dtype=np.uint16).tolist()) == text


@needs_shakespeare
def test_shakespeare_char_from_a_mirror_url(server, tmp_path):
    server.files["/m/tinyshakespeare/input.txt"] = SHAKESPEARE.read_bytes()
    result = run_script("shakespeare_char", "--data_dir", "out", cwd=tmp_path,
                        env={common.MIRROR_ENV: server.url + "/m"})
    assert result.returncode == 0, result.stderr
    train, _, meta = nanogpt_char_recipe(SHAKESPEARE.read_text(encoding="utf-8"))
    assert (tmp_path / "out" / "train.bin").read_bytes() == train
    assert (tmp_path / "out" / "meta.pkl").read_bytes() == meta


@needs_shakespeare
def test_shakespeare_bpe_is_byte_identical_to_nanogpt(tmp_path):
    result = run_script("shakespeare", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "data" / "shakespeare"
    # nanoGPT's data/shakespeare/prepare.py: a 90/10 split on characters, then GPT-2 BPE of each part.
    text = SHAKESPEARE.read_text(encoding="utf-8")
    n = len(text)
    enc = data.gpt2_encoding()
    train = np.array(enc.encode_ordinary(text[:int(n * 0.9)]), dtype=np.uint16)
    val = np.array(enc.encode_ordinary(text[int(n * 0.9):]), dtype=np.uint16)
    assert (out / "train.bin").read_bytes() == train.tobytes()
    assert (out / "val.bin").read_bytes() == val.tobytes()
    assert (len(train), len(val)) == (301_966, 36_059)
    assert not (out / "meta.pkl").exists()
    assert "train has 301,966 tokens" in result.stdout and "val has 36,059 tokens" in result.stdout
    assert enc.decode(np.fromfile(out / "val.bin", dtype=np.uint16).tolist()) == text[int(n * 0.9):]


def test_script_errors_are_one_clear_line(tmp_path):
    result = run_script("shakespeare_char", cwd=tmp_path, env={common.MIRROR_ENV: str(tmp_path)})
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: TRITONGPT_MIRROR={tmp_path} has no tinyshakespeare/input.txt; put the "
                                     f"file there, or unset TRITONGPT_MIRROR to download {common.TINYSHAKESPEARE_URL}")


# --- fineweb ---

FINEWEB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
FINEWEB_REVISION = "/api/datasets/HuggingFaceFW/fineweb-edu/revision/main"
FINEWEB_API = f"/api/datasets/HuggingFaceFW/fineweb-edu/tree/{FINEWEB_COMMIT}/sample/10BT"
FINEWEB_FILES = f"/datasets/HuggingFaceFW/fineweb-edu/resolve/{FINEWEB_COMMIT}/"
WORDS = "the of and to in is was that for on with as by at from his her they be this which or".split()


def fake_documents(seed: int, count: int, max_words: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(0, max_words))).capitalize() + "." for _ in range(count)]


@pytest.fixture
def fineweb_hub(server, tmp_path):
    """A fake hub serving three small parquet files, listed over two pages, and the token stream
    fineweb.py should make of them, derived here from the documents."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    enc = data.gpt2_encoding()
    # The middle file has more rows than one read batch (1024), so resuming can land in a later batch. A null
    # row (None) is a document without text, as an empty one.
    documents = {"000_00000.parquet": fake_documents(0, 40, 300) + ["", None, "a literal <|endoftext|> in the text"],
                 "001_00000.parquet": fake_documents(1, 1500, 12),
                 "002_00000.parquet": fake_documents(2, 30, 200)}
    listing = [{"type": "directory", "path": "sample/10BT/extra", "oid": "0", "size": 0}]
    for name, docs in documents.items():
        buf = io.BytesIO()
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), buf, row_group_size=500)
        body = buf.getvalue()
        server.files[FINEWEB_FILES + "sample/10BT/" + name] = body
        listing.append({"type": "file", "path": f"sample/10BT/{name}", "oid": "git-sha1", "size": len(body),
                        "lfs": {"oid": sha(body), "size": len(body), "pointerSize": 134}})
    server.files[FINEWEB_REVISION] = json_bytes({"id": "HuggingFaceFW/fineweb-edu", "sha": FINEWEB_COMMIT})
    server.files[FINEWEB_API] = json_bytes(listing[:2])
    server.headers[FINEWEB_API] = {"Link": f'<{server.url}{FINEWEB_API}?cursor=2>; rel="next"'}
    server.files[FINEWEB_API + "?cursor=2"] = json_bytes(listing[2:])
    stream = [np.array([common.EOT] + enc.encode_ordinary(doc or ""), dtype=np.uint16)
              for docs in documents.values() for doc in docs]
    return server, np.concatenate(stream)


def json_bytes(obj) -> bytes:
    return json.dumps(obj).encode()


def read_shard_by_hand(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[0] == 20240520 and header[1] == 1 and not header[3:].any()
    tokens = np.frombuffer(raw[1024:], dtype="<u2")
    assert header[2] == len(tokens)
    return tokens


def shard_files(data_dir: Path) -> list[Path]:
    """The shards in stream order: by their number, not their name (train sorts before val)."""
    return sorted(data_dir.glob("*.bin"), key=lambda p: p.name[-10:])


def expected_names(count: int) -> list[str]:
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, count)]


def run_fineweb(*args: str):
    from prepare import fineweb
    fineweb.main(["--workers", "2", *args])


def test_fineweb_end_to_end(fineweb_hub, tmp_path):
    server, stream = fineweb_hub
    shard_size = 997
    result = run_script("fineweb", "--hub_url", server.url, "--shard_size", str(shard_size), "--workers", "2",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data_dir = tmp_path / "data" / "fineweb_edu"
    count = -(-len(stream) // shard_size)
    assert count > 20
    assert [p.name for p in shard_files(data_dir)] == expected_names(count)
    shards = [read_shard_by_hand(p) for p in shard_files(data_dir)]
    assert all(len(s) == shard_size for s in shards[:-1])
    assert shards[0][0] == common.EOT
    np.testing.assert_array_equal(np.concatenate(shards), stream)
    assert sorted(p.name for p in (data_dir / "parquet").iterdir()) == [
        "000_00000.parquet", "001_00000.parquet", "002_00000.parquet"]
    assert f"{count - 1} train shard(s), {len(stream):,} tokens" in result.stdout

    # Loadable for training.
    from tritongpt import data
    assert data.TokenSplit(data_dir, "train", vocab_size=50257).num_tokens == len(stream) - shard_size

    # A re-run keeps everything: no shard rewritten, no parquet file downloaded again.
    mtimes = [p.stat().st_mtime_ns for p in shard_files(data_dir)]
    server.requests.clear()
    run_fineweb("--hub_url", server.url, "--shard_size", str(shard_size), "--data_dir", str(data_dir))
    assert [p.stat().st_mtime_ns for p in shard_files(data_dir)] == mtimes
    assert not any(FINEWEB_FILES in path for path, _ in server.requests)


def test_fineweb_resumes_where_it_stopped(fineweb_hub, tmp_path, capsys):
    server, _ = fineweb_hub
    args = ["--hub_url", server.url, "--shard_size", "500", "--data_dir", str(tmp_path)]
    run_fineweb(*args)
    original = {p.name: p.read_bytes() for p in shard_files(tmp_path)}
    assert len(original) > 40
    # Interrupted at various points: mid-way through the first file, in the big file's second read
    # batch, near the end; and with a truncated shard in the middle.
    for first_missing in [3, 25, len(original) - 2]:
        for p in shard_files(tmp_path)[first_missing:]:
            p.unlink()
        capsys.readouterr()
        run_fineweb(*args)
        assert f"keeping the {first_missing} shard(s)" in capsys.readouterr().out
        assert {p.name: p.read_bytes() for p in shard_files(tmp_path)} == original
    broken = shard_files(tmp_path)[10]
    broken.write_bytes(broken.read_bytes()[:-2])
    run_fineweb(*args)
    assert {p.name: p.read_bytes() for p in shard_files(tmp_path)} == original


def test_fineweb_keeps_the_commit_it_started_from(fineweb_hub, tmp_path, capsys):
    """The first run records the commit main named; when upstream moves on, extending the shards still reads
    that commit's files (and says so), so the shards never mix two versions of the dataset."""
    server, stream = fineweb_hub
    args = ["--hub_url", server.url, "--shard_size", "1000", "--data_dir", str(tmp_path)]
    run_fineweb(*args, "--shards", "1")
    record = json.loads((tmp_path / "hub_revision.json").read_text())
    assert record == {"repo": "HuggingFaceFW/fineweb-edu", "commit": FINEWEB_COMMIT}
    moved = "f" * 40
    server.files[FINEWEB_REVISION] = json_bytes({"sha": moved})  # upstream changed; its files are not served
    capsys.readouterr()
    run_fineweb(*args, "--shards", "3")
    out = capsys.readouterr().out
    assert f"main is now {moved}); continuing with commit {FINEWEB_COMMIT}" in out
    assert not any(moved in path for path, _ in server.requests)
    shards = [read_shard_by_hand(p) for p in shard_files(tmp_path)]
    np.testing.assert_array_equal(np.concatenate(shards), stream[:4000])
    (tmp_path / "hub_revision.json").write_text(json.dumps({"repo": "HuggingFaceFW/fineweb", "commit": moved}))
    with pytest.raises(common.PrepareError, match="was made from HuggingFaceFW/fineweb, not HuggingFaceFW/fineweb-edu"):
        run_fineweb(*args, "--shards", "4")


@pytest.mark.parametrize("record, message", [
    ('{"repo": "HuggingFaceFW/fineweb-edu", "commit": "../../../../evil?x="}', "does not name a commit"),
    ('{"repo": "HuggingFaceFW/fineweb-edu", "commit": "ABCDEF0123456789abcdef0123456789abcdef01"}', "does not name a"),
    ('{"repo": "HuggingFaceFW/fineweb-edu", "comm', "is not JSON"),
    ('["a list"]', "does not name a commit"),
])
def test_a_damaged_revision_record_is_refused_before_any_file_request(fineweb_hub, tmp_path, record, message):
    """The recorded commit goes into the hub's URLs, with HF_TOKEN attached: anything but 40 hex digits is
    refused, so no request can be steered to another path of the hub's host."""
    server, _ = fineweb_hub
    (tmp_path / "hub_revision.json").write_text(record)
    with pytest.raises(common.PrepareError, match=rf"hub_revision\.json {message}.*delete it"):
        run_fineweb("--hub_url", server.url, "--shard_size", "1000", "--data_dir", str(tmp_path))
    assert [path for path, _ in server.requests] == [FINEWEB_REVISION]


def test_fineweb_subsets(fineweb_hub, tmp_path):
    server, stream = fineweb_hub
    run_fineweb("--hub_url", server.url, "--shard_size", "1000", "--max_tokens", "2500",
                "--data_dir", str(tmp_path / "a"))
    shards = [read_shard_by_hand(p) for p in shard_files(tmp_path / "a")]
    assert [len(s) for s in shards] == [1000, 1000, 500]
    np.testing.assert_array_equal(np.concatenate(shards), stream[:2500])
    # Files are downloaded as the tokenizer reaches them (it reads a little ahead): the last is never needed.
    assert not (tmp_path / "a" / "parquet" / "002_00000.parquet").exists()
    # Complete: a re-run needs no network at all.
    run_fineweb("--hub_url", closed_port_url(), "--shard_size", "1000", "--max_tokens", "2500",
                "--data_dir", str(tmp_path / "a"))

    run_fineweb("--hub_url", server.url, "--shard_size", "1000", "--shards", "2", "--data_dir", str(tmp_path / "b"))
    assert [p.name for p in shard_files(tmp_path / "b")] == expected_names(3)
    # Asking for less than is there would leave extra shards that training would read: refused.
    with pytest.raises(common.PrepareError, match=r"also fineweb_train_000002\.bin, left from an earlier"):
        run_fineweb("--hub_url", server.url, "--shard_size", "1000", "--shards", "1", "--data_dir", str(tmp_path / "b"))


def test_fineweb_errors(fineweb_hub, tmp_path):
    server, stream = fineweb_hub
    name = FINEWEB_FILES + "sample/10BT/000_00000.parquet"
    good = server.files[name]
    server.files[name] = good[:-1] + b"X"  # same size, wrong sha256
    with pytest.raises(fileio.DownloadError, match=r"000_00000\.parquet is corrupt: its sha256"):
        run_fineweb("--hub_url", server.url, "--shard_size", "1000", "--data_dir", str(tmp_path / "a"))
    server.files[name] = good
    with pytest.raises(common.PrepareError, match="only 1 shard"):
        run_fineweb("--hub_url", server.url, "--shard_size", str(len(stream)), "--data_dir", str(tmp_path / "b"))
    # Shards made from other data are not continued.
    from tritongpt import data
    (tmp_path / "c").mkdir()
    data.write_shard(tmp_path / "c" / "fineweb_val_000000.bin", np.full(1000, 7))
    with pytest.raises(common.PrepareError, match="do not match the documents"):
        run_fineweb("--hub_url", server.url, "--shard_size", "1000", "--data_dir", str(tmp_path / "c"))
    with pytest.raises(fileio.DownloadError, match=r"(?s)Could not get .*/revision/main.*--hub_url"):
        run_fineweb("--hub_url", closed_port_url(), "--data_dir", str(tmp_path / "d"))


def test_fineweb_without_pyarrow_says_how_to_install_it(monkeypatch, tmp_path):
    from prepare import fineweb
    monkeypatch.setattr(fineweb, "pq", None)
    with pytest.raises(common.PrepareError, match="pip install pyarrow"):
        fineweb.main(["--data_dir", str(tmp_path)])
