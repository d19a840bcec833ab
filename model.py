"""The GPT-2 model, with nanoGPT's parameter names so checkpoints move freely between the two.

Attention and layer norm have interchangeable implementations picked at run time, not stored in the
checkpoint: attention `eager` (explicit masked softmax: what people write by hand), `sdpa`
(F.scaled_dot_product_attention) or `triton` (our flash attention kernel); layer norm `torch` or
`triton` (our fused kernel). `auto` takes the Triton kernels where they can run (CUDA, a supported shape
and dtype) and PyTorch's otherwise.
"""
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch.nn import functional as F

from data import atomic_open

ATTN_IMPLS = ("auto", "eager", "sdpa", "triton")
LN_IMPLS = ("auto", "torch", "triton")


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, like GPT-2; False is a bit better and faster

    @classmethod
    def from_dict(cls, model_args: dict) -> "GPTConfig":
        """Build from a checkpoint's model_args, ignoring keys this config does not know."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in model_args.items() if k in names})


# -----------------------------------------------------------------------------
# Run-time implementation choice


def kernels_module():
    """Import kernels/ on first use, so CPU-only users never need Triton."""
    try:
        import kernels
    except ImportError as error:
        raise RuntimeError(
            f"the Triton kernels could not be imported ({error}); install triton (pip install triton) "
            "or use attn_impl='sdpa' and ln_impl='torch'"
        ) from error
    return kernels


def triton_can_run(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def check_triton_can_run(x: torch.Tensor, what: str, fallback: str) -> None:
    if not triton_can_run(x):
        raise RuntimeError(
            f"{what}='triton' needs a CUDA GPU, but the model runs on {x.device.type}; use {what}='{fallback}' "
            "(or 'auto'), or set TRITON_INTERPRET=1 before starting Python to run the kernels slowly in "
            "Triton's interpreter (for testing)"
        )


def check_impl(name: str, value: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ValueError(f"{name} must be one of {valid}, got {value!r}")
    return value


def resolve_attn_impl(attn_impl: str, q: torch.Tensor) -> str:
    if attn_impl == "auto":
        supported = q.is_cuda and kernels_module().flash_attention_supported(q.size(-1), q.dtype, q.device)
        return "triton" if supported else "sdpa"
    if attn_impl == "triton":
        check_triton_can_run(q, "attn_impl", "sdpa")
    return attn_impl


def resolve_ln_impl(ln_impl: str, x: torch.Tensor) -> str:
    if ln_impl == "auto":
        return "triton" if x.is_cuda and kernels_module().layer_norm_supported(x.dtype, x.device) else "torch"
    if ln_impl == "triton":
        check_triton_can_run(x, "ln_impl", "torch")
    return ln_impl


def causal_mask(t_query: int, t_key: int, device: torch.device) -> torch.Tensor:
    """Query i (the last t_query of t_key positions) may see keys up to its own position."""
    return torch.ones(t_query, t_key, dtype=torch.bool, device=device).tril(diagonal=t_key - t_query)


def attention(q, k, v, impl: str, dropout_p: float) -> torch.Tensor:
    """Causal attention over (B, H, T, D) tensors. Keys may be longer than queries (a KV cache):
    then the queries are the last positions."""
    t_query, t_key = q.size(-2), k.size(-2)
    impl = resolve_attn_impl(impl, q)
    if impl == "triton" and t_query == t_key:
        return kernels_module().flash_attention(q, k, v, causal=True, dropout_p=dropout_p)
    if impl == "eager":
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        scores = scores.masked_fill(~causal_mask(t_query, t_key, q.device), float("-inf"))
        probs = F.dropout(F.softmax(scores, dim=-1), p=dropout_p)
        return probs @ v
    # sdpa, and the triton impl's decoding steps: SDPA aligns is_causal to the top left, so a query block
    # shorter than the keys gets an explicit mask, and a single query needs none.
    if t_query == t_key:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    mask = None if t_query == 1 else causal_mask(t_query, t_key, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


# -----------------------------------------------------------------------------
# The model


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.impl = "auto"

    def forward(self, x):
        if resolve_ln_impl(self.impl, x) == "triton":
            return kernels_module().layer_norm(x, self.weight, self.bias, 1e-5)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class LayerCache:
    """One layer's keys and values for incremental decoding, allocated on first use with the dtype the
    attention actually computes in (autocast's, under mixed precision)."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.k: torch.Tensor | None = None  # (B, H, max_length, D)
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the keys and values of positions start.., return those of all positions so far."""
        if self.k is None or self.k.shape[0] != k.shape[0] or self.k.dtype != k.dtype:
            shape = (k.shape[0], k.shape[1], self.max_length, k.shape[3])
            self.k = k.new_empty(shape)
            self.v = v.new_empty(shape)
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of every layer for the positions seen so far (generation only)."""

    def __init__(self, config: GPTConfig):
        self.layers = [LayerCache(config.block_size) for _ in range(config.n_layer)]
        self.length = 0  # positions filled


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.impl = "auto"

    def forward(self, x, cache: LayerCache | None = None, start: int = 0):
        B, T, C = x.size()
        # (B, T, 3, H, D) -> three (B, H, T, D) views; the Triton kernel reads the strides as they are
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.update(k, v, start)
        dropout_p = self.dropout if self.training else 0.0
        y = attention(q, k, v, self.impl, dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache: LayerCache | None = None, start: int = 0):
        x = x + self.attn(self.ln_1(x), cache, start)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, attn_impl: str = "auto", ln_impl: str = "auto"):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (https://paperswithcode.com/method/weight-tying): one matrix embeds and unembeds.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections: 0.02/sqrt(2 * n_layer)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.set_impl(attn_impl, ln_impl)

    def set_impl(self, attn_impl: str = "auto", ln_impl: str = "auto") -> None:
        """Choose the attention and layer norm implementations (a run-time choice, not saved)."""
        check_impl("attn_impl", attn_impl, ATTN_IMPLS)
        check_impl("ln_impl", ln_impl, LN_IMPLS)
        self.attn_impl, self.ln_impl = attn_impl, ln_impl
        for module in self.modules():
            if isinstance(module, CausalSelfAttention):
                module.impl = attn_impl
            elif isinstance(module, LayerNorm):
                module.impl = ln_impl

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position embeddings (the token embeddings are
        counted once, as the tied lm_head)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache: KVCache | None = None):
        """With targets: (logits for every position, mean cross-entropy ignoring targets of -1).
        Without: (logits for the last position only, None): all that generation needs, and cheaper."""
        device = idx.device
        b, t = idx.size()
        start = cache.length if cache is not None else 0
        if start + t > self.config.block_size:
            raise ValueError(
                f"cannot forward a sequence of length {start + t}: block_size is {self.config.block_size}; "
                "crop the input to the last block_size tokens"
            )
        pos = torch.arange(start, start + t, dtype=torch.long, device=device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache.layers[i] if cache is not None else None, start)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.length = start + t
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            return logits, loss
        return self.lm_head(x[:, [-1], :]), None  # the list index keeps the time dim

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context length, e.g. to finetune GPT-2 (1024) with a shorter block."""
        if block_size > self.config.block_size:
            raise ValueError(f"can only crop block_size down: {block_size} > {self.config.block_size}")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type) -> torch.optim.AdamW:
        """AdamW with weight decay on the matrices (2D+) only, not on biases and layer norm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # The fused kernel does the whole update in one launch; PyTorch has it on CUDA and (2.4+) CPU.
        try:
            return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))
        except (RuntimeError, TypeError):
            return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L H Q T."""
        cfg = self.config
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * cfg.block_size

    def estimate_mfu(self, fwdbwd_per_iter: int, dt: float, peak_flops: float | None) -> float | None:
        """Model FLOPs utilization: achieved FLOP/s over the device's peak (None when the peak is unknown)."""
        if peak_flops is None or dt <= 0:
            return None
        flops_per_iter = self.flops_per_token() * self.config.block_size * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate_stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        refill: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield max_new_tokens next tokens (B, 1), one at a time, continuing idx (B, T).

        Each token is conditioned on the last block_size tokens, as in nanoGPT. With the KV cache the prompt
        is run once and then each step runs only the newest token. Once the sequence is longer than
        block_size, every position's embedding shifts with the window, so the cache cannot be reused and
        each step runs the whole window again: exactly what happens without the cache. `refill=N` trades
        that exactness for speed: when the window is full, restart the cache from the last N tokens and
        decode one token per step again until it fills, so each token sees between N and block_size tokens.
        """
        block_size = self.config.block_size
        if refill is not None and not 0 < refill < block_size:
            raise ValueError(f"refill must be between 1 and block_size - 1 ({block_size - 1}), got {refill}")
        cache = KVCache(self.config) if use_cache else None
        for _ in range(max_new_tokens):
            if cache is not None and 0 < cache.length < block_size:
                logits, _ = self(idx[:, -1:], cache=cache)
            elif cache is not None and (cache.length == 0 or refill is not None):
                context = block_size if cache.length == 0 else refill
                cache.length = 0
                logits, _ = self(idx[:, -context:], cache=cache)
            else:  # no cache, or an exact one past block_size, where what it would store is never reused
                logits, _ = self(idx[:, -block_size:])
            idx_next = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)
            idx = torch.cat((idx, idx_next), dim=1)
            yield idx_next

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, **kwargs):
        """idx (B, T) followed by max_new_tokens sampled tokens; keyword arguments as generate_stream."""
        new_tokens = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, **kwargs))
        return torch.cat([idx, *new_tokens], dim=1)

    @classmethod
    def from_pretrained(
        cls, name_or_dir: str, override_args: dict | None = None, attn_impl: str = "auto", ln_impl: str = "auto"
    ) -> "GPT":
        """GPT-2 in Hugging Face's format: one of GPT2_NAMES (downloaded from the hub once, then cached) or
        a local directory. override_args may set dropout only, as in nanoGPT."""
        return load_hf_gpt2(name_or_dir, override_args or {}, attn_impl, ln_impl)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors that transformers' GPT2LMHeadModel.from_pretrained loads
        with the same logits (and from_pretrained here too)."""
        save_hf_gpt2(self, Path(directory))


def sample_next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of logits (B, V): greedy at temperature 0, else sampled from the softmax at that
    temperature, restricted to the top_k most likely tokens and/or the smallest set whose probability
    reaches top_p (nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the ones ranked above it already reach top_p (the most likely always stays)
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


# -----------------------------------------------------------------------------
# Checkpoints (nanoGPT's format)


def clean_state_dict(state_dict: dict) -> dict:
    """Make a saved state dict loadable: drop torch.compile's `_orig_mod.` prefix and the causal-mask
    buffers (`.attn.bias`) that nanoGPT saves when it runs without flash attention."""
    prefix = "_orig_mod."
    cleaned = {}
    for key, value in state_dict.items():
        key = key[len(prefix) :] if key.startswith(prefix) else key
        if key.endswith(".attn.bias") and value.dim() == 4:
            continue
        cleaned[key] = value
    return cleaned


def model_from_checkpoint(checkpoint: dict, attn_impl: str = "auto", ln_impl: str = "auto") -> GPT:
    """A GPT with the weights of a checkpoint written by our train.py or nanoGPT's."""
    for key in ("model", "model_args"):
        if key not in checkpoint:
            raise ValueError(f"not a nanoGPT/tritongpt checkpoint: the '{key}' entry is missing")
    model = GPT(GPTConfig.from_dict(checkpoint["model_args"]), attn_impl, ln_impl)
    model.load_state_dict(clean_state_dict(checkpoint["model"]))
    # a finetuned GPT-2 keeps GPT-2's tanh GELU; nanoGPT's checkpoints have no such key (exact GELU)
    set_gelu_approximate(model, checkpoint.get("gelu_approximate", "none"))
    return model


# Dense bf16/fp16 tensor-core peaks in FLOP/s, by the name CUDA reports (first match wins, so the more
# specific names come first). A GPU missing here gets no MFU rather than a wrong one.
GPU_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("V100", 125e12),
    ("T4", 65e12),
)


def gpu_peak_flops(device: str, dtype: str) -> float | None:
    """The tensor-core peak of the GPU running this process, or None (CPU, fp32, or an unknown GPU)."""
    if not device.startswith("cuda") or dtype not in ("bfloat16", "float16") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, peak in GPU_PEAK_FLOPS:
        if key in name:
            return peak
    return None


# -----------------------------------------------------------------------------
# GPT-2 weights (Hugging Face format)
#
# Hugging Face's GPT2LMHeadModel uses our parameter names (nanoGPT took them from OpenAI's GPT-2), with
# two differences in storage: its Conv1D layers keep Linear weights transposed, as (in, out), and the
# lm_head, tied to wte, is not stored at all.
#
# One difference in the math: GPT-2's MLP uses the tanh approximation of GELU ("gelu_new"), nanoGPT the
# exact one. Even a randomly initialized GPT-2 (124M) has logits ~1e-3 apart under the two, so a model
# loaded from HF weights runs its GELUs with approximate="tanh" and matches HF's logits. This is a setting
# of the modules (set_gelu_approximate), not a GPTConfig field, so checkpoints keep nanoGPT's model_args;
# train.py records it under a key of its own, which nanoGPT ignores.

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # 124M, 350M, 774M and 1558M parameters
HF_ENDPOINT = "https://huggingface.co"
HF_ENDPOINT_ENV = "TRITONGPT_HF_ENDPOINT"  # a mirror of the hub (or, in the tests, a local server)
CACHE_ENV = "TRITONGPT_CACHE"  # downloads go to $TRITONGPT_CACHE/<name>, by default ~/.cache/tritongpt/<name>
HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"  # a sharded checkpoint: which shard holds each tensor
HF_PYTORCH_BIN = "pytorch_model.bin"
HF_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_GELU_APPROXIMATE = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}  # nn.GELU's name
# GPT2Config's defaults: transformers leaves a key out of config.json when it has its default value.
HF_GPT2_DEFAULTS = dict(
    vocab_size=50257,
    n_positions=1024,
    n_embd=768,
    n_layer=12,
    n_head=12,
    n_inner=None,
    activation_function="gelu_new",
    layer_norm_epsilon=1e-5,
    scale_attn_weights=True,
    scale_attn_by_inverse_layer_idx=False,
    tie_word_embeddings=True,
)
GPT2_EOT = 50256  # <|endoftext|>, GPT-2's bos and eos token


def set_gelu_approximate(model: nn.Module, approximate: str) -> None:
    """Run every GELU exactly ('none', nanoGPT's) or with the tanh approximation ('tanh', GPT-2's)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    for module in model.modules():
        if isinstance(module, nn.GELU):
            module.approximate = approximate


def gelu_approximate(model: nn.Module) -> str:
    return next((m.approximate for m in model.modules() if isinstance(m, nn.GELU)), "none")


def gpt2_download(name: str) -> Path:
    """The cache directory of a GPT-2 size, after downloading its config and weights there if needed."""
    from prepare.common import download  # imported on use: loading a local model needs no network code

    endpoint = os.environ.get(HF_ENDPOINT_ENV, HF_ENDPOINT).rstrip("/")
    directory = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tritongpt") / name
    hint = (
        f", or set {HF_ENDPOINT_ENV} to a mirror of {HF_ENDPOINT}, or pass a directory holding "
        f"{HF_CONFIG} and {HF_SAFETENSORS} instead of {name!r}"
    )
    for file in (HF_CONFIG, HF_SAFETENSORS):
        download(f"{endpoint}/openai-community/{name}/resolve/main/{file}", directory / file, hint=hint)
    return directory


def gpt2_directory(name_or_dir: str) -> Path:
    if name_or_dir in GPT2_NAMES:
        return gpt2_download(name_or_dir)
    directory = Path(name_or_dir)
    if not directory.is_dir():
        raise ValueError(
            f"{name_or_dir!r} is neither a GPT-2 model name ({', '.join(GPT2_NAMES)}) nor a directory; a local "
            f"directory in Hugging Face GPT-2 format ({HF_CONFIG} + {HF_SAFETENSORS}, as save_pretrained "
            "writes) works too"
        )
    return directory


def gpt_config_from_hf(hf_config: dict, source: Path, dropout: float) -> tuple[GPTConfig, str]:
    """Our config and GELU approximation for an HF config.json; an error for anything that would make
    this GPT compute differently from HF's GPT2LMHeadModel."""
    hf = {**HF_GPT2_DEFAULTS, **hf_config}
    problems = []
    if hf.get("model_type") != "gpt2":
        problems.append(f"model_type is {hf.get('model_type')!r}, not 'gpt2'")
    if hf["activation_function"] not in HF_GELU_APPROXIMATE:
        problems.append(f"activation_function is {hf['activation_function']!r}, not one of {list(HF_GELU_APPROXIMATE)}")
    if hf["layer_norm_epsilon"] != 1e-5:
        problems.append(f"layer_norm_epsilon is {hf['layer_norm_epsilon']}, not 1e-5")
    if hf["n_inner"] not in (None, 4 * hf["n_embd"]):
        problems.append(f"n_inner is {hf['n_inner']}, not 4 * n_embd")
    if not hf["scale_attn_weights"] or hf["scale_attn_by_inverse_layer_idx"]:
        problems.append("attention scores are not scaled by 1/sqrt(head size) alone")
    if not hf["tie_word_embeddings"]:
        problems.append("lm_head is not tied to the token embedding")
    if hf["n_embd"] % hf["n_head"]:
        problems.append(f"n_embd {hf['n_embd']} is not divisible by n_head {hf['n_head']}")
    if problems:
        raise ValueError(f"{source} is not a GPT-2 config this model can load: {'; '.join(problems)}")
    config = GPTConfig(
        block_size=hf["n_positions"],
        vocab_size=hf["vocab_size"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        dropout=dropout,
        bias=True,
    )
    return config, HF_GELU_APPROXIMATE[hf["activation_function"]]


def hf_weight_files(directory: Path) -> list[Path]:
    """The files holding an HF checkpoint's tensors: model.safetensors, its shards, or pytorch_model.bin."""
    if (directory / HF_SAFETENSORS).is_file():
        return [directory / HF_SAFETENSORS]
    if (directory / HF_SAFETENSORS_INDEX).is_file():
        weight_map = json.loads((directory / HF_SAFETENSORS_INDEX).read_text())["weight_map"]
        return [directory / shard for shard in sorted(set(weight_map.values()))]
    if (directory / HF_PYTORCH_BIN).is_file():
        return [directory / HF_PYTORCH_BIN]
    raise FileNotFoundError(f"{directory} has no {HF_SAFETENSORS} (nor {HF_SAFETENSORS_INDEX} or {HF_PYTORCH_BIN})")


def read_hf_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, one tensor in memory at a time where the format allows (safetensors)."""
    for file in files:
        if file.suffix == ".bin":
            yield from torch.load(file, map_location="cpu", weights_only=True).items()
            continue
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def our_name(hf_name: str) -> str | None:
    """Our parameter name for an HF GPT-2 tensor; None for what we do not keep: the tied lm_head and the
    causal-mask buffers (attn.bias, attn.masked_bias) of older checkpoints."""
    name = hf_name.removeprefix("transformer.")  # the hub's files were saved from GPT2Model: no prefix
    if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
        return None
    return f"transformer.{name}"


@torch.no_grad()
def load_hf_tensors(model: GPT, tensors: Iterable[tuple[str, torch.Tensor]], source: Path) -> None:
    """Copy HF GPT-2 tensors into the model, checking that every parameter gets one of the right shape."""
    params = dict(model.named_parameters())  # the tied lm_head.weight is listed once, as transformer.wte.weight
    missing = set(params)
    for hf_name, tensor in tensors:
        name = our_name(hf_name)
        if name is None:
            continue
        if name not in params:
            raise ValueError(f"{source} has a tensor {hf_name!r} that GPT-2 does not have")
        if name.endswith(HF_CONV1D_WEIGHTS):
            tensor = tensor.t()
        if tensor.shape != params[name].shape:
            raise ValueError(
                f"{source}: {hf_name} has shape {tuple(tensor.shape)}, but {HF_CONFIG} implies "
                f"{tuple(params[name].shape)}{' (transposed, as Conv1D)' if name.endswith(HF_CONV1D_WEIGHTS) else ''}"
            )
        params[name].copy_(tensor)
        missing.discard(name)
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} of the model's tensors: {', '.join(sorted(missing)[:5])}")


def load_hf_gpt2(name_or_dir: str, override_args: dict, attn_impl: str, ln_impl: str) -> GPT:
    unsupported = sorted(set(override_args) - {"dropout"})
    if unsupported:
        raise ValueError(
            f"from_pretrained can only override dropout (the architecture comes from {HF_CONFIG}), got {unsupported}"
        )
    directory = gpt2_directory(name_or_dir)
    config_path = directory / HF_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{directory} has no {HF_CONFIG}; a Hugging Face GPT-2 directory holds {HF_CONFIG} and {HF_SAFETENSORS}"
        )
    dropout = override_args.get("dropout", 0.0)
    config, approximate = gpt_config_from_hf(json.loads(config_path.read_text()), config_path, dropout)
    files = hf_weight_files(directory)  # before building the model: a missing file fails fast
    model = GPT(config, attn_impl, ln_impl)
    load_hf_tensors(model, read_hf_tensors(files), directory)
    set_gelu_approximate(model, approximate)
    return model


def hf_config(model: GPT) -> dict:
    cfg = model.config
    eot = GPT2_EOT if cfg.vocab_size > GPT2_EOT else None  # a small vocabulary has no <|endoftext|>
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new" if gelu_approximate(model) == "tanh" else "gelu",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "use_cache": True,
    }


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's tensors under HF GPT-2 names: Linear weights transposed to Conv1D's (in, out), zeros for
    the biases of a bias=False model (HF's GPT-2 always has biases; zero ones change nothing), and no
    lm_head, which HF ties to wte."""
    tensors = {}
    for name, module in model.transformer.named_modules(prefix="transformer"):
        if isinstance(module, nn.Embedding):
            tensors[f"{name}.weight"] = module.weight
        elif isinstance(module, (nn.Linear, LayerNorm)):
            tensors[f"{name}.weight"] = module.weight.t() if isinstance(module, nn.Linear) else module.weight
            zeros = module.weight.new_zeros(module.weight.shape[0])
            tensors[f"{name}.bias"] = module.bias if module.bias is not None else zeros
    return {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}


def save_hf_gpt2(model: GPT, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    # each file goes to a temporary name first: readers see the old file or the new one, never a torn one
    with atomic_open(directory / HF_SAFETENSORS) as f:
        f.write(safetensors_bytes(hf_state_dict(model), metadata={"format": "pt"}))
    with atomic_open(directory / HF_CONFIG) as f:
        f.write((json.dumps(hf_config(model), indent=2) + "\n").encode())
