"""Tiny Shakespeare at the character level: data/shakespeare_char/{train.bin, val.bin, meta.pkl, meta.json}.

    python prepare/shakespeare_char.py [--data_dir DIR]

The output is byte for byte what nanoGPT's data/shakespeare_char/prepare.py writes: the first 90% of
the characters are train, the rest val, each character's id is its rank in the sorted set of
characters (65 of them), and meta.pkl holds vocab_size, itos and stoi for sample.py to decode. meta.json,
ours, holds the same vocabulary in a format that cannot carry code.
Set TRITONGPT_MIRROR to a directory or URL holding tinyshakespeare/input.txt to work offline.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prepare import common  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_data_dir_arg(parser, "shakespeare_char")
    args = parser.parse_args(argv)
    data_dir = common.data_dir_for(args.data_dir, "shakespeare_char")

    text = common.fetch_tinyshakespeare(data_dir)
    print(f"length of dataset in characters: {len(text):,}")
    meta = common.char_meta(text)
    print("all the unique characters:", "".join(meta["stoi"]))
    print(f"vocab size: {meta['vocab_size']:,}")
    ids = common.char_ids(text, meta)
    n_train = int(len(text) * 0.9)
    print(f"train has {n_train:,} tokens")
    print(f"val has {len(ids) - n_train:,} tokens")
    common.write_splits(data_dir, ids[:n_train], ids[n_train:], meta)


if __name__ == "__main__":
    common.run(main)
