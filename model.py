"""The GPT-2 model, with nanoGPT's parameter names so checkpoints move freely between the two.

Attention, layer norm and the training loss have interchangeable implementations picked at run time, not
stored in the checkpoint: model.set_impl says which run. `auto` runs PyTorch's until tritongpt/impls.py's
choose_impls (which train.py and sample.py call once, on the run's device) picks, timing our kernels
against PyTorch's on CUDA.
"""
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.nn import functional as F

from tritongpt import hf
from tritongpt.ops import AttentionMask, attention, document_bounds, kernels_module
from tritongpt.generate import KVCache, LayerCache, generate_stream
from tritongpt.metrics import mfu_per_gpu
from tritongpt.optim import build_optimizer


# The implementations each part can run: attention `eager` (the masked softmax written out), `sdpa`
# (F.scaled_dot_product_attention), `triton` (our flash attention kernel) or `flex` (FlexAttention, compiled on
# CUDA); layer norm `torch` or `triton` (our fused kernel); the training loss `torch` (F.cross_entropy of the
# logits) or `triton` (the fused linear cross-entropy). `auto`: PyTorch's until impls.choose_impls picks.
ATTN_IMPLS = ("auto", "eager", "sdpa", "triton", "flex")
LN_IMPLS = ("auto", "torch", "triton")
CE_IMPLS = ("auto", "torch", "triton")


class Impls(NamedTuple):
    attn: str
    ln: str
    ce: str


PYTORCH_IMPLS = Impls("sdpa", "torch", "torch")


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, like GPT-2; False is a bit better and faster
    # The modern recipe's switches, all off by default (GPT-2's architecture). Checkpoints record the ones
    # that are on, so a GPT-2-shaped model's model_args stay exactly nanoGPT's.
    pos_embedding: str = "learned"  # 'learned' (GPT-2's wpe) or 'rope' (rotary, on q and k of each head)
    rope_base: float = 10000.0  # RoPE's base: position p turns frequency i by p * base^(-2i/head_dim)
    norm: str = "layernorm"  # 'layernorm' or 'rmsnorm' (no mean, no bias)
    qk_norm: bool = False  # RMS-normalize q and k of each head before attention
    activation: str = "gelu"  # 'gelu' or 'relu2' (ReLU squared)
    tie_embeddings: bool = True  # lm_head shares wte's matrix (False: its own, zero-initialized)
    logit_softcap: float = 0.0  # 0: off; c > 0: logits = c * tanh(logits / c)
    zero_init_proj: bool = False  # zero-initialize the residual output projections (attention and MLP c_proj)
    # Packed documents and sliding windows: with doc_token >= 0 (GPT-2's <|endoftext|> is 50256), that token
    # starts a document and a query sees only its own document's keys; doc_positions restarts the positions
    # at each document; attn_window > 0 keeps only the last attn_window keys of each query, its own included.
    doc_token: int = -1
    doc_positions: bool = False
    attn_window: int = 0

    def __post_init__(self):
        choices = {"pos_embedding": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"), "activation": ("gelu", "relu2")}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ValueError(f"{key} must be one of {valid}, got {getattr(self, key)!r}")
        if self.logit_softcap < 0:
            raise ValueError(f"logit_softcap must be 0 (off) or a positive cap, got {self.logit_softcap}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.pos_embedding == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"pos_embedding='rope' rotates pairs of dimensions: the head size "
                             f"n_embd / n_head = {self.n_embd // self.n_head} must be even")
        if self.rope_base <= 1:
            raise ValueError(f"rope_base must be > 1, got {self.rope_base}")
        if not -1 <= self.doc_token < self.vocab_size:
            raise ValueError(f"doc_token must be a token id below vocab_size={self.vocab_size}, or -1 (no document "
                             f"masking), got {self.doc_token}")
        if self.doc_positions and self.doc_token < 0:
            raise ValueError("doc_positions restarts the positions at each document: it needs doc_token, the token "
                             "that starts one (50256 for GPT-2's BPE)")
        if self.attn_window < 0:
            raise ValueError(f"attn_window must be >= 0 (0: no window), got {self.attn_window}")

    @classmethod
    def from_dict(cls, model_args: dict) -> "GPTConfig":
        """Build from a checkpoint's model_args, ignoring keys this config does not know."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in model_args.items() if k in names})

    def switches_on(self) -> dict:
        """The modern-recipe switches that differ from GPT-2's architecture."""
        default = GPTConfig()
        return {key: getattr(self, key) for key in SWITCHES if getattr(self, key) != getattr(default, key)}


SWITCHES = ("pos_embedding", "rope_base", "norm", "qk_norm", "activation", "tie_embeddings", "logit_softcap",
            "zero_init_proj", "doc_token", "doc_positions", "attn_window")


def rotary_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's (cos, sin), (T, head_dim / 2) (or (B, 1, T, head_dim / 2) for positions per row, (B, T)):
    position p turns frequency i by p * base^(-2i/head_dim).
    Computed once per forward for every layer, in float64 (float32 on MPS, which has none): positions grow
    without bound when a KV cache rolls past block_size, and float32 angles lose precision there."""
    half = head_dim // 2
    dtype = torch.float32 if positions.device.type == "mps" else torch.float64
    inv_freq = base ** (-torch.arange(half, dtype=dtype, device=positions.device) / half)
    angles = positions.to(dtype)[..., None] * inv_freq
    if positions.dim() == 2:  # per row: broadcast over the heads
        angles = angles[:, None]
    return angles.cos(), angles.sin()


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (B, H, T, D): the pair (x[i], x[i + D/2]) turns by the angle whose cos and sin are given."""
    half = x.size(-1) // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


# -----------------------------------------------------------------------------
# The model


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1), or RMSNorm (rms=True: no
    mean subtracted, no bias) under the same name, so both keep nanoGPT's parameter names."""

    def __init__(self, ndim: int, bias: bool, rms: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias and not rms else None
        self.rms = rms
        self.impl = "torch"  # set by GPT.set_impl

    def forward(self, x):
        if self.rms:
            if self.impl == "triton":
                return kernels_module().rms_norm(x, self.weight, 1e-5)
            return F.rms_norm(x, self.weight.shape, self.weight, 1e-5)
        if self.impl == "triton":
            return kernels_module().layer_norm(x, self.weight, self.bias, 1e-5)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.head_dim = config.n_embd // config.n_head
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        self.impl = "sdpa"  # set by GPT.set_impl

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: "LayerCache | None" = None,
                start: int = 0, mask: AttentionMask | None = None):
        B, T, _ = x.size()
        # (B, T, 3C) -> three (B, H, T, D) views; the Triton kernel reads the strides as they are. Split, as
        # nanoGPT does: the backward then writes the three gradients into one (B, T, 3C) tensor, where viewing
        # it as (B, T, 3, H, D) and permuting costs a stack and then a copy of all of it. The head count is
        # what c_attn gives, not n_head: under tensor parallelism a rank holds some heads only.
        qkv = self.c_attn(x)
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in qkv.split(qkv.size(-1) // 3, dim=2))
        if self.qk_norm:
            # an explicit eps: F.rms_norm's default is the dtype's, which would change with autocast
            q, k = F.rms_norm(q, (q.size(-1),), eps=1e-5), F.rms_norm(k, (k.size(-1),), eps=1e-5)
        if rope is not None:
            q, k = rotary(q, *rope), rotary(k, *rope)
        if cache is not None and mask is not None:
            k, v, mask = cache.update_masked(k, v, start, mask)
        elif cache is not None:
            k, v = cache.update(k, v, start)
        dropout_p = self.dropout if self.training else 0.0
        y = attention(q, k, v, self.impl, dropout_p, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU() if config.activation == "gelu" else None  # nanoGPT's name, for its GELU setting
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.c_fc(x)
        x = self.gelu(x) if self.gelu is not None else F.relu(x).square()
        return self.dropout(self.c_proj(x))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        rms = config.norm == "rmsnorm"
        self.ln_1 = LayerNorm(config.n_embd, config.bias, rms)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.bias, rms)
        self.mlp = MLP(config)

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: "LayerCache | None" = None,
                start: int = 0, mask: AttentionMask | None = None):
        x = x + self.attn(self.ln_1(x), rope, cache, start, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, attn_impl: str = "auto", ln_impl: str = "auto"):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos_embedding == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules.update(drop=nn.Dropout(config.dropout), h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                       ln_f=LayerNorm(config.n_embd, config.bias, config.norm == "rmsnorm"))
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # Weight tying (https://paperswithcode.com/method/weight-tying): one matrix embeds and unembeds.
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                # GPT-2's scaled init of the residual projections, 0.02/sqrt(2 * n_layer); or zero, so that
                # each block starts as the identity and grows into the residual stream
                std = 0.0 if config.zero_init_proj else 0.02 / math.sqrt(2 * config.n_layer)
                torch.nn.init.normal_(param, mean=0.0, std=std)
        if not config.tie_embeddings:
            torch.nn.init.zeros_(self.lm_head.weight)  # the untied head starts at uniform predictions
        self.set_impl(attn_impl, ln_impl)

    def set_impl(self, attn_impl: str = "auto", ln_impl: str = "auto", ce_impl: str = "auto") -> None:
        """Which attention, layer norm and training-loss implementations run (a run-time choice, not saved):
        `requested` keeps what was asked, `running` what runs, where `auto` is PyTorch's until
        impls.choose_impls picks (on the run's device, once) and sets its choice here."""
        for name, value, valid in (("attn_impl", attn_impl, ATTN_IMPLS), ("ln_impl", ln_impl, LN_IMPLS),
                                   ("ce_impl", ce_impl, CE_IMPLS)):
            if value not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {value!r}")
        self.requested = Impls(attn_impl, ln_impl, ce_impl)
        self.running = Impls(*(default if value == "auto" else value
                               for value, default in zip(self.requested, PYTORCH_IMPLS)))
        for module in self.modules():
            if isinstance(module, CausalSelfAttention):
                module.impl = self.running.attn
            elif isinstance(module, LayerNorm):
                module.impl = self.running.ln
        self.told_about_decoding = False  # generate.py says once that SDPA decodes for the triton kernel

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the embeddings, whose lookups cost no FLOPs (tied token
        embeddings are counted once, as the lm_head they share)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n_params -= self.transformer.wpe.weight.numel()
        if non_embedding and not self.config.tie_embeddings:
            n_params -= self.transformer.wte.weight.numel()  # a lookup, not a matmul: no FLOPs
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache: "KVCache | None" = None):
        """With targets: (logits for every position, mean cross-entropy ignoring targets of -1).
        Without: (logits for the last position only, None): all that generation needs, and cheaper."""
        device = idx.device
        b, t = idx.size()
        start = cache.length if cache is not None else 0
        rolling = cache is not None and cache.rolling and t == 1
        if start + t > self.config.block_size and not rolling:
            raise ValueError(
                f"cannot forward a sequence of length {start + t}: block_size is {self.config.block_size}; "
                "crop the input to the last block_size tokens"
            )
        mask, positions = self.layout(idx, start, cache)
        x = self.embed(idx, start, positions)
        rope = self.rotary(t, start, device, positions)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, cache.layers[i] if cache is not None else None, start, mask)
        if cache is not None:
            cache.length = start + t
        if targets is None:
            x = x[:, [-1], :]  # generation needs the last position only; the list index keeps the time dim
        elif self.training and self.running.ce == "triton":
            # the loss and its gradients without the (B, T, vocab) logits; evaluation keeps returning them
            loss = kernels_module().linear_cross_entropy(self.transformer.ln_f(x), self.lm_head.weight, targets,
                                                         self.config.logit_softcap)
            return None, loss
        logits = self.head(x)
        if targets is None:
            return logits, None
        return logits, cross_entropy(logits, targets)

    # The forward's three parts, which a pipeline stage also runs on its own (parallelism/pipeline.py)

    def layout(self, idx: torch.Tensor, start: int = 0,
               cache: "KVCache | None" = None) -> tuple[AttentionMask | None, torch.Tensor | None]:
        """Documents and the window for tokens (B, T) at positions start.. (None without either), and each
        token's position (B, T) when positions restart at each document (None: start..start+T for all).
        Documents come from the tokens themselves: no other input is needed."""
        cfg = self.config
        if cfg.doc_token < 0 and not cfg.attn_window:
            return None, None
        starts = ends = None
        if cfg.doc_token >= 0:
            carried = cache.doc_start if cache is not None and start > 0 else None
            starts, ends = document_bounds(idx, cfg.doc_token, carried, start)
            if cache is not None:
                cache.doc_start = starts[:, -1]
        positions = None
        if cfg.doc_positions:
            positions = torch.arange(start, start + idx.size(1), device=idx.device) - starts
        return AttentionMask(starts, ends, cfg.attn_window), positions

    def embed(self, idx: torch.Tensor, start: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens (B, T) at positions start.. (or `positions`, (B, T)) -> the residual stream (B, T, C)."""
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            if positions is None:
                positions = torch.arange(start, start + idx.size(1), dtype=torch.long, device=idx.device)
            x = x + self.transformer.wpe(positions)
        return self.transformer.drop(x)

    def rotary(self, t: int, start: int, device: torch.device,
               positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """RoPE's tables for positions start..start+t (or `positions`, (B, T)), shared by every layer (None
        with learned positions)."""
        if self.config.pos_embedding != "rope":
            return None
        if positions is None:
            positions = torch.arange(start, start + t, dtype=torch.long, device=device)
        return rotary_tables(positions, self.config.n_embd // self.config.n_head, self.config.rope_base)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stream -> logits: final norm, lm_head, and the softcap if there is one."""
        logits = self.lm_head(self.transformer.ln_f(x))
        if self.config.logit_softcap:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context length, e.g. to finetune GPT-2 (1024) with a shorter block."""
        if block_size > self.config.block_size:
            raise ValueError(f"can only crop block_size down: {block_size} > {self.config.block_size}")
        self.config.block_size = block_size
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type) -> torch.optim.Optimizer:
        """nanoGPT's AdamW, with weight decay on the matrices (2D+) only, not on biases and norm gains.
        (optim.py builds it, and the Muon alternative.)"""
        return build_optimizer(self, "adamw", learning_rate, weight_decay, betas, device_type)

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L H Q T."""
        cfg = self.config
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * cfg.block_size

    def estimate_mfu(self, fwdbwd_per_iter: int, dt: float, peak_flops: float | None) -> float | None:
        """Model FLOPs utilization: achieved FLOP/s over the device's peak (None when the peak is unknown)."""
        return mfu_per_gpu(self.flops_per_token() * self.config.block_size, fwdbwd_per_iter, dt, peak_flops)

    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, **kwargs) -> Iterator[torch.Tensor]:
        """Yield max_new_tokens next tokens (B, 1), one at a time, continuing idx (B, T); top_p, use_cache,
        generator, refill and roll as generate.generate_stream, which does the work."""
        return generate_stream(self, idx, max_new_tokens, temperature, top_k, **kwargs)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, **kwargs):
        """idx (B, T) followed by max_new_tokens sampled tokens; keyword arguments as generate_stream."""
        new_tokens = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, **kwargs))
        return torch.cat([idx, *new_tokens], dim=1)

    @classmethod
    def from_pretrained(
        cls, name_or_dir: str, override_args: dict | None = None, attn_impl: str = "auto", ln_impl: str = "auto"
    ) -> "GPT":
        """GPT-2 in Hugging Face's format: one of hf.GPT2_NAMES (downloaded from the hub once, then cached)
        or a local directory. override_args may set dropout only, as in nanoGPT."""
        pretrained = hf.find_pretrained(name_or_dir, override_args or {})
        config = GPTConfig(**pretrained.config)
        shapes = list(hf.read_hf_shapes(pretrained.files))
        hf.check_hf_layers(config.n_layer, shapes, pretrained.source)
        with torch.device("meta"):  # the parameters' shapes, without their memory
            expected = {name: tuple(p.shape) for name, p in cls(config, "sdpa", "torch").named_parameters()}
        hf.check_hf_shapes(expected, shapes, pretrained.source)  # before the model takes any memory
        model = cls(config, attn_impl, ln_impl)
        hf.load_hf_tensors(dict(model.named_parameters()), hf.read_hf_tensors(pretrained.files))
        set_gelu_approximate(model, pretrained.approximate)
        return model

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors that transformers' GPT2LMHeadModel.from_pretrained loads
        with the same logits (and from_pretrained here too). A model GPT-2's format cannot hold is refused
        before anything is written."""
        config = hf.hf_config(self.config, self.config.switches_on(), gelu_approximate(self))
        hf.save_hf_gpt2(config, hf.hf_state_dict(self.state_dict()), Path(directory))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The training loss: mean cross-entropy over all positions, ignoring targets of -1."""
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def set_gelu_approximate(model: nn.Module, approximate: str) -> None:
    """Run every GELU exactly ('none', nanoGPT's) or with the tanh approximation ('tanh', GPT-2's)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    for module in model.modules():
        if isinstance(module, nn.GELU):
            module.approximate = approximate


def gelu_approximate(model: nn.Module) -> str:
    return next((m.approximate for m in model.modules() if isinstance(m, nn.GELU)), "none")
