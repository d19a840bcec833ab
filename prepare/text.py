"""Your own text files as a dataset: data/<name>/{train.bin, val.bin} (+ meta.json, meta.pkl for characters).

    python prepare/text.py --name poems --input 'poems/*.txt' more.txt [--tokenizer char|gpt2]
                           [--val_fraction 0.1] [--data_dir DIR]

Then train with `python train.py --dataset=poems`; for char, train.py reads the vocabulary size from meta.json.

- Each input file is one document. Files come in the order given on the command line, each glob's
  matches sorted by name; a file named twice (or reached again through a symlink) is read once. They must be UTF-8. Line endings are
  normalized to \\n, as Python's text mode (and so nanoGPT) does.
- char: the vocabulary is the sorted set of characters in all the files, written to meta.json and to
  meta.pkl in nanoGPT's format; documents are concatenated as they are, since a char vocabulary has no separator.
- gpt2: tiktoken's GPT-2 BPE (encode_ordinary: "<|endoftext|>" in the text is plain text). Every
  document starts with the end-of-text token 50256, as in prepare/fineweb.py and llm.c, so the model
  sees where one ends and the next begins.
- The last --val_fraction of the token stream is the val split; the rest, before it, is train.
  With one file and the char tokenizer that is exactly nanoGPT's shakespeare_char split.
"""
import argparse
import glob
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prepare import common  # noqa: E402
from tritongpt import data  # noqa: E402


def input_files(patterns: list[str]) -> list[Path]:
    """The files the patterns name, in order, each once: a file reached by two names (a symlink, a loop of
    linked folders under **) would otherwise be read twice and could land in both train and val."""
    files: dict[Path, Path] = {}  # real path -> the first name it was found under; a dict keeps the order
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise common.PrepareError(f"--input {pattern!r} matched no files")
        for match in map(Path, matches):
            if match.is_dir():
                raise common.PrepareError(f"--input {match} is a directory; name the files in it, e.g. '{match}/*.txt'")
            files.setdefault(match.resolve(), match)
    return list(files.values())


def read_document(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise common.PrepareError(
            f"{path} is not UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start:,} ({e.reason}). Convert it, "
            f"e.g. `iconv -f latin1 -t utf-8 {path} > fixed.txt` if it is Latin-1, or leave it out"
        ) from e
    return text.replace("\r\n", "\n").replace("\r", "\n")


def gpt2_ids(documents: list[str]) -> np.ndarray:
    enc = data.gpt2_encoding()
    encoded = enc.encode_ordinary_batch(documents)
    return np.concatenate([np.array([common.EOT] + ids, dtype=np.uint16) for ids in encoded])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="dataset name: train.py's --dataset")
    parser.add_argument("--input", required=True, nargs="+", help="text files or globs (quote globs)")
    parser.add_argument("--tokenizer", choices=["char", "gpt2"], default="char")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="share of the tokens, at the end, kept for val")
    common.add_data_dir_arg(parser, "NAME")
    args = parser.parse_args(argv)
    if not args.name or Path(args.name).name != args.name or args.name in (".", ".."):
        raise common.PrepareError(f"--name {args.name!r} must be a plain directory name, like poems")
    if not 0 < args.val_fraction < 1:
        raise common.PrepareError(f"--val_fraction must be between 0 and 1 (exclusive), got {args.val_fraction}")

    files = input_files(args.input)
    documents = [read_document(path) for path in files]
    for path, doc in zip(files, documents):
        if not doc:
            print(f"warning: {path} is empty", file=sys.stderr)
    num_chars = sum(map(len, documents))
    if num_chars == 0:
        raise common.PrepareError(f"the {len(files)} input file(s) hold no text")
    print(f"{len(files):,} file(s), {num_chars:,} characters")

    if args.tokenizer == "char":
        text = "".join(documents)
        meta = common.char_meta(text)
        ids = common.char_ids(text, meta)
        print(f"vocab size: {meta['vocab_size']:,} characters")
    else:
        meta = None
        ids = gpt2_ids(documents)
        print("vocab size: 50,257 (GPT-2 BPE)")
    n_train = int(len(ids) * (1 - args.val_fraction))
    if n_train == 0 or n_train == len(ids):
        raise common.PrepareError(f"{len(ids):,} tokens are too few to split into train and val with "
                                  f"--val_fraction {args.val_fraction}; add text or change --val_fraction")
    print(f"train has {n_train:,} tokens")
    print(f"val has {len(ids) - n_train:,} tokens")
    data_dir = common.data_dir_for(args.data_dir, args.name)
    common.write_splits(data_dir, ids[:n_train], ids[n_train:], meta)


if __name__ == "__main__":
    common.run(main)
