"""The Hugging Face hub, as GPT-2 weights (hf.py) and FineWeb (prepare/fineweb.py) use it.

- Which server: $TRITONGPT_HF_ENDPOINT, else $HF_ENDPOINT (the variable every Hugging Face tool reads, set
  behind firewalls and in regions with mirrors), else https://huggingface.co.
- Which credentials: $HF_TOKEN, sent as a bearer token. Files are served through redirects to a CDN;
  requests drops the Authorization header when a redirect leaves the hub's host, so the token never
  reaches it.
- Which version: a run resolves the branch (main) to a commit once and uses that commit for the listing
  and for every file, so an upstream change in the middle of a download cannot mix two versions.
- Which bytes: the listing gives each file's size, and an LFS file's sha256; downloads are checked
  against both.
- Every request goes through fileio's retry policy (429 and 5xx answers, Retry-After).
"""
import os
import re
from dataclasses import dataclass

from tritongpt.fileio import DownloadError, get

DEFAULT_ENDPOINT = "https://huggingface.co"
ENDPOINT_ENV = "TRITONGPT_HF_ENDPOINT"  # overrides HF_ENDPOINT for this project only
KINDS = ("model", "dataset")
COMMIT = re.compile(r"[0-9a-f]{40}")  # a git commit as the hub names it: it goes into URLs, so nothing else may


def is_commit(value: object) -> bool:
    return isinstance(value, str) and COMMIT.fullmatch(value) is not None


def endpoint() -> str:
    return (os.environ.get(ENDPOINT_ENV) or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def auth_headers() -> dict[str, str]:
    token = os.environ.get("HF_TOKEN", "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


@dataclass(frozen=True)
class RemoteFile:
    path: str  # inside the repository
    size: int
    sha256: str | None  # LFS files only; a small file is checked by its size


def _api(base: str, kind: str, repo: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return f"{base}/api/{kind}s/{repo}"


def resolve_revision(base: str, kind: str, repo: str, revision: str = "main", hint: str = "") -> str:
    """The commit (40 hex digits) that `revision` (a branch, a tag or a commit) names now."""
    response = get(f"{_api(base, kind, repo)}/revision/{revision}", auth_headers(), hint=hint)
    commit = response.json().get("sha")
    if not is_commit(commit):
        raise DownloadError(f"{base} did not name a commit for {repo}@{revision} (got {commit!r}){hint}")
    return commit


def list_files(base: str, kind: str, repo: str, commit: str, folder: str = "", hint: str = "") -> list[RemoteFile]:
    """The files in `folder` of the repository at `commit`, from the tree API (which pages with Link headers)."""
    if not is_commit(commit):
        raise ValueError(f"{commit!r} is not a commit (40 hex digits)")
    url = f"{_api(base, kind, repo)}/tree/{commit}" + (f"/{folder}" if folder else "")
    entries = []
    while url:
        response = get(url, auth_headers(), hint=hint)
        entries += response.json()
        url = response.links.get("next", {}).get("url")
    return [RemoteFile(e["path"], e["size"], (e.get("lfs") or {}).get("oid"))
            for e in entries if e.get("type") == "file"]


def file_url(base: str, kind: str, repo: str, commit: str, path: str) -> str:
    if not is_commit(commit):
        raise ValueError(f"{commit!r} is not a commit (40 hex digits)")
    prefix = "datasets/" if kind == "dataset" else ""
    return f"{base}/{prefix}{repo}/resolve/{commit}/{path}"
