"""
Sample from a trained model (the checkpoint in out_dir: ckpt.pt, or an FSDP run's ckpt_dcp/) or a
pretrained GPT-2:

$ python sample.py --out_dir=out-shakespeare-char
$ python sample.py --init_from=gpt2-xl --start="What is the answer to life?" --num_samples=3 --top_p=0.9
$ python sample.py --init_from=gpt2 --start=FILE:prompt.txt --stream=True --stop_at_eot=True
"""
import codecs
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tritongpt import checkpoint as ckpt
from tritongpt.configurator import autocast, configure, error_boundary, resolve_compile, resolve_device, resolve_dtype
from tritongpt.data import TokenizerError, gpt2_encoding, load_meta
from tritongpt.fileio import DownloadError
from tritongpt.generate import check_sampling
from tritongpt.impls import choose_impls
from model import GPT

# -----------------------------------------------------------------------------
init_from = "resume"  # 'resume' (the checkpoint in out_dir), a GPT-2 name ('gpt2', ..., 'gpt2-xl') or an HF model dir
out_dir = "out"  # ignored unless init_from is 'resume'
start = "\n"  # or "<|endoftext|>" or etc. Can also specify a file, use as: "FILE:prompt.txt"
num_samples = 10  # number of samples to draw
max_new_tokens = 500  # number of tokens generated in each sample
temperature = 0.8  # 1.0 = no change, < 1.0 = less random, > 1.0 = more random; 0 = greedy
top_k: int | None = 200  # keep only the top_k most likely tokens (None: all)
top_p: float | None = None  # keep the smallest set of tokens whose probability reaches top_p (None: all)
seed = 1337
device = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto', 'float32', 'bfloat16' or 'float16'
compile: bool | str = False  # torch.compile the model (faster sampling after a slow first step)
kv_cache = True  # run the prompt once and then one token per step
kv_refill: int | None = None  # past block_size, restart the cache from the last N tokens (faster, inexact)
kv_roll = False  # RoPE models: past block_size, the cache rolls (one token per step; sliding-window attention)
stream = False  # print tokens as they are generated
stop_at_eot = False  # end a sample at GPT-2's <|endoftext|> token
attn_impl = "auto"
ln_impl = "auto"
# -----------------------------------------------------------------------------


@dataclass
class Tokenizer:
    encode: Callable[[str], list[int]]
    decode_bytes: Callable[[list[int]], bytes]  # bytes, so a character split across tokens streams whole
    eot: int | None  # the end-of-text token, if the vocabulary has one


def char_tokenizer(meta: dict) -> Tokenizer:
    stoi, itos = meta["stoi"], meta["itos"]

    def encode(text: str) -> list[int]:
        unknown = sorted(set(text) - set(stoi))
        if unknown:
            raise SystemExit(f"error: the prompt has characters outside the model's vocabulary: {unknown}")
        return [stoi[c] for c in text]

    return Tokenizer(encode, lambda ids: "".join(itos[i] for i in ids).encode(), None)


def gpt2_tokenizer() -> Tokenizer:
    try:
        enc = gpt2_encoding()  # tiktoken's, with a clear error when its files cannot be had
    except TokenizerError as error:
        raise SystemExit(f"error: {error}") from None
    return Tokenizer(lambda s: enc.encode(s, allowed_special={"<|endoftext|>"}), enc.decode_bytes, enc.eot_token)


def load_model(init_from: str, out_dir: str, attn_impl: str = "auto", ln_impl: str = "auto") -> tuple[GPT, Tokenizer]:
    """The model and the tokenizer it was trained with: the dataset's char vocabulary if it has a
    meta.json or meta.pkl (as nanoGPT's sample.py finds it), else GPT-2's BPE."""
    try:
        if init_from != "resume":
            return GPT.from_pretrained(init_from, attn_impl=attn_impl, ln_impl=ln_impl), gpt2_tokenizer()
        checkpoint = ckpt.require(out_dir, latest=False)
        model = ckpt.build_model(checkpoint, attn_impl, ln_impl)
    except (ckpt.CheckpointError, DownloadError, ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    train_config = checkpoint.state.get("config", {})
    meta = None
    if "dataset" in train_config:
        meta = load_meta(train_config.get("data_dir") or os.path.join("data", train_config["dataset"]))
    if meta is not None:
        print(f"using the character vocabulary of {train_config['dataset']} (its meta file)")
        return model, char_tokenizer(meta)
    return model, gpt2_tokenizer()


def read_prompt(start: str) -> str:
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:") :]
    if not os.path.isfile(path):
        raise SystemExit(f"error: prompt file {path} not found (from start=FILE:{path})")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SystemExit(f"error: prompt file {path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset "
                         f"{error.start:,}); convert it, e.g. iconv -f latin1 -t utf-8 {path}") from None


@dataclass
class SamplingSettings:
    max_new_tokens: int = 500
    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None
    kv_cache: bool = True
    kv_refill: int | None = None
    kv_roll: bool = False
    stop_at_eot: bool = False

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p, self.max_new_tokens)


def generate_text(model: GPT, tokenizer: Tokenizer, prompt_ids: list[int], batch: int, settings: SamplingSettings,
                  on_token: Callable[[bytes], None] | None = None) -> list[str]:
    """`batch` continuations of the prompt; on_token(bytes) is called with each new token of sample 0."""
    device = next(model.parameters()).device
    idx = torch.tensor(prompt_ids, dtype=torch.long, device=device).expand(batch, -1)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    rows = [[] for _ in range(batch)]
    stream_kwargs = dict(top_p=settings.top_p, use_cache=settings.kv_cache, refill=settings.kv_refill,
                         roll=settings.kv_roll)
    tokens = model.generate_stream(idx, settings.max_new_tokens, settings.temperature, settings.top_k, **stream_kwargs)
    for token in tokens:
        token = token.squeeze(1)
        if settings.stop_at_eot and tokenizer.eot is not None:
            finished |= token == tokenizer.eot
        for row, (tok, done) in enumerate(zip(token.tolist(), finished.tolist())):
            if not done:
                rows[row].append(tok)
        if on_token is not None and not finished[0]:
            on_token(tokenizer.decode_bytes([token[0].item()]))
        if bool(finished.all()):
            break
    return [tokenizer.decode_bytes(prompt_ids + row).decode("utf-8", errors="replace") for row in rows]


def main() -> None:
    error_boundary()  # a failure ends with one line saying what to do (TRITONGPT_DEBUG=1 shows the traceback)
    config = configure(globals())
    try:
        settings = SamplingSettings(**{key: config[key] for key in SamplingSettings.__dataclass_fields__})
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    torch.manual_seed(config["seed"])
    device = resolve_device(config["device"])
    dtype = resolve_dtype(config["dtype"], device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model, tokenizer = load_model(config["init_from"], config["out_dir"], config["attn_impl"], config["ln_impl"])
    model.eval().to(device)
    # `auto`: a Triton kernel on CUDA where it supports the model's shapes, else PyTorch's (nothing to time)
    choose_impls(model, config["num_samples"], device, getattr(torch, dtype), measure=False)
    if resolve_compile(config["compile"], device):
        model.compile()  # in place, so the generation loop's calls of the model go through it
    prompt_ids = tokenizer.encode(read_prompt(config["start"]))
    if not prompt_ids:
        raise SystemExit("error: the prompt is empty; use --start='\\n' or --start='<|endoftext|>' for an unconditional sample")
    with torch.no_grad(), autocast(device, dtype):
        if config["stream"]:
            for _ in range(config["num_samples"]):
                utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
                sys.stdout.write(tokenizer.decode_bytes(prompt_ids).decode("utf-8", errors="replace"))
                generate_text(model, tokenizer, prompt_ids, 1, settings,
                              lambda b: print(utf8.decode(b), end="", flush=True))
                print("\n---------------")
        else:
            for text in generate_text(model, tokenizer, prompt_ids, config["num_samples"], settings):
                print(text)
                print("---------------")


if __name__ == "__main__":
    main()
