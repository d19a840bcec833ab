"""The Hugging Face side of the GPT-2 interop tests, run as its own process the way a user's environment
would be: `python -I tests/transformers_side.py JOBS.json`. Isolated mode (-I) keeps the repository off
sys.path, so `import transformers` finds Hugging Face's packages (transformers imports one named `kernels`,
the name of our kernel folder) and nothing of ours. Tensors come and go as safetensors files.

JOBS.json holds a list of jobs, run in order in this one process (transformers takes seconds to import):
- {"op": "make", "dir": D, "seed": S, "config": {...}, "max_shard_size": "100KB" or null,
   "tokens": T, "logits": L}: a tiny random GPT2LMHeadModel (every parameter random, biases and layer norms
   included, so a tensor loaded into the wrong place or left untransposed shows in the logits) saved with
   save_pretrained to D, and its logits for the tokens in T written to L.
- {"op": "logits", "dir": D, "tokens": T, "logits": L}: GPT2LMHeadModel.from_pretrained(D)'s logits.
"""
import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

# Big enough weights that the exact and tanh GELUs differ clearly in the logits (HF's default
# initializer_range of 0.02 leaves the MLP inputs so small that they agree to ~1e-5).
INIT_STD = 0.1
TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=100, initializer_range=INIT_STD,
            bos_token_id=None, eos_token_id=None)


@torch.no_grad()
def logits_of(hf, tokens_file: str, logits_file: str) -> None:
    tokens = load_file(tokens_file)["tokens"]
    save_file({"logits": hf.eval()(tokens).logits.contiguous()}, logits_file)


@torch.no_grad()
def make(job: dict) -> None:
    torch.manual_seed(job["seed"])
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**TINY, **job.get("config", {})})).eval()
    for param in hf.parameters():
        param.add_(torch.randn_like(param) * 0.05)
    shard = job.get("max_shard_size")
    hf.save_pretrained(job["dir"], **({"max_shard_size": shard} if shard else {}))
    logits_of(hf, job["tokens"], job["logits"])


def main(jobs_file: str) -> None:
    repo = str(Path(__file__).resolve().parent.parent)
    if any(Path(entry or ".").resolve() == Path(repo) for entry in sys.path):
        sys.exit(f"run this with python -I: the repository ({repo}) is on sys.path, and its kernels/ would "
                 "shadow the kernels package transformers imports")
    transformers.logging.set_verbosity_error()
    for job in json.loads(Path(jobs_file).read_text()):
        if job["op"] == "make":
            make(job)
        elif job["op"] == "logits":
            logits_of(transformers.GPT2LMHeadModel.from_pretrained(job["dir"]), job["tokens"], job["logits"])
        else:
            sys.exit(f"unknown job {job['op']!r} in {jobs_file}")


if __name__ == "__main__":
    main(sys.argv[1])
