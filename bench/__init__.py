"""Benchmarks, each a script run from the repository root:

    python bench/attn.py        # attention: eager vs PyTorch SDPA (flash) vs our Triton kernel
    python bench/layernorm.py   # layer norm: ours vs F.layer_norm, eager and compiled, vs copy bandwidth
    python bench/train.py       # a whole training step: tokens/s, MFU and memory per implementation
    python bench/sample.py      # generation: tokens/s without and with the KV cache

Each prints a markdown table; `--out DIR` also writes it as .md, .json and .png; `--quick` is a
seconds-long smoke run that works on CPU too.
"""
