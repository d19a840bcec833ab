"""Tiny Shakespeare in GPT-2 BPE tokens: data/shakespeare/{train.bin, val.bin}.

    python prepare/shakespeare.py [--data_dir DIR]

The output is byte for byte what nanoGPT's data/shakespeare/prepare.py writes: the text is split
90/10 on characters, then each part is encoded with tiktoken's GPT-2 encode_ordinary (no special
tokens). There is no meta.json or meta.pkl: train.py and sample.py take a missing one to mean GPT-2's vocabulary.
Set TRITONGPT_MIRROR to a directory or URL holding tinyshakespeare/input.txt to work offline.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prepare import common  # noqa: E402
from tritongpt import data  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_data_dir_arg(parser, "shakespeare")
    args = parser.parse_args(argv)
    data_dir = common.data_dir_for(args.data_dir, "shakespeare")

    text = common.fetch_tinyshakespeare(data_dir)
    enc = data.gpt2_encoding()
    n_train = int(len(text) * 0.9)
    train_ids = enc.encode_ordinary(text[:n_train])
    val_ids = enc.encode_ordinary(text[n_train:])
    print(f"train has {len(train_ids):,} tokens")
    print(f"val has {len(val_ids):,} tokens")
    common.write_splits(data_dir, train_ids, val_ids)


if __name__ == "__main__":
    common.run(main)
