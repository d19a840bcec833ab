"""What the prepare scripts share: downloading, the offline mirror, char vocabularies, CLI plumbing (GPT-2's
tokenizer is tritongpt.data.gpt2_encoding, which sample.py uses too)."""
import argparse
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tritongpt import data
from tritongpt.configurator import UserError
from tritongpt.fileio import atomic_open, check_existing, download, file_problem

MIRROR_ENV = "TRITONGPT_MIRROR"
EOT = 50256  # GPT-2's <|endoftext|>
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_MIRROR_PATH = "tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINYSHAKESPEARE_SIZE = 1_115_394


class PrepareError(UserError, RuntimeError):
    """A problem the user can fix; the scripts print its message without a traceback."""


def run(main: Callable[[list[str] | None], None]) -> None:
    try:
        main(None)
    except UserError as e:  # PrepareError, DownloadError, TokenizerError: messages that say the fix
        sys.exit(f"error: {e}")


def add_data_dir_arg(parser: argparse.ArgumentParser, default_name: str) -> None:
    parser.add_argument("--data_dir", type=Path, default=None,
                        help=f"output directory (default: data/{default_name}, relative to the current directory, "
                             "where train.py looks for it)")


def data_dir_for(arg: Path | None, name: str) -> Path:
    data_dir = arg if arg is not None else Path("data") / name
    data_dir.mkdir(parents=True, exist_ok=True)
    return data_dir


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
    if check_existing(dest, sha256, size):
        return dest
    source = Path(mirror) / mirror_path
    if not source.is_file():
        raise PrepareError(f"{MIRROR_ENV}={mirror} has no {mirror_path}; put the file there, "
                           f"or unset {MIRROR_ENV} to download {url}")
    problem = file_problem(source, sha256, size)
    if problem:
        raise PrepareError(f"{source} (from {MIRROR_ENV}) is not the expected file: {problem}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as src, atomic_open(dest) as out:
        shutil.copyfileobj(src, out)
    return dest


def fetch_tinyshakespeare(data_dir: Path) -> str:
    """The tiny Shakespeare text, read the way nanoGPT reads it (text mode, universal newlines)."""
    path = fetch(TINYSHAKESPEARE_URL, data_dir / "input.txt", TINYSHAKESPEARE_MIRROR_PATH,
                 TINYSHAKESPEARE_SHA256, TINYSHAKESPEARE_SIZE)
    with open(path, encoding="utf-8") as f:
        return f.read()


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
    """train.bin, val.bin and, for char vocabularies, meta.pkl in nanoGPT's format (and meta.json). Without
    a meta, old vocabulary files go: left behind, they would make train.py and sample.py use the wrong one."""
    data.write_tokens(data_dir / "train.bin", train_ids)
    data.write_tokens(data_dir / "val.bin", val_ids)
    if meta is not None:
        data.write_meta(data_dir, meta)
    for path in [] if meta is not None else data.remove_meta(data_dir):
        print(f"removed the old {path}: this dataset uses GPT-2 BPE, not a char vocabulary")
    written = ["train.bin", "val.bin"] + ([data.META_PKL, data.META_JSON] if meta is not None else [])
    print(f"wrote {', '.join(written)} to {data_dir}")
