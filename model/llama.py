"""Llama-2 on the meditron_kernels ops, in one file.

Pre-norm decoder: RMSNorm, grouped-query attention with rotary positions (fused into the
attention op), SwiGLU MLP. Every op goes through meditron_kernels, so a backend switch
(``meditron_kernels.use_backend`` or MEDITRON_KERNELS_BACKEND) changes all of them.

The model stays plain nn: tensor, sequence and pipeline parallelism, FSDP, activation
checkpointing and compile are applied from outside (train/parallelize.py). Layers sit in a
ModuleDict keyed by index so a pipeline stage can delete the ones it does not own, and the
embedding, final norm and head may be None on stages that do not hold them.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

import meditron_kernels as mk
from meditron_kernels.nn import RMSNorm, SwiGLU


@dataclasses.dataclass
class LlamaConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None: as many as n_heads (no GQA)
    vocab_size: int = 32000
    ffn_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "max_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {v!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"LlamaConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LlamaConfig.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig head_dim = dim / n_heads = {self.head_dim} must be even for rotary")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_name(cls, name: str) -> "LlamaConfig":
        """One of PRESETS, by exact name."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count (the input embedding and output head are the 'embedding' part)."""
        d, kv = self.dim, self.n_kv_heads * self.head_dim
        per_layer = d * d * 2 + d * kv * 2 + 3 * d * self.ffn_dim + 2 * d
        n = self.n_layers * per_layer + d
        if include_embedding:
            n += 2 * self.vocab_size * d
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, the primary MFU formula: 6 N_non_embedding + 12 n_layers dim seq.

        6 N counts the forward and backward matmuls of every weight (the head included: it is a
        matmul, while the embedding is a lookup); 12 L d s counts the attention score and value
        matmuls, forward and backward, without causal halving.
        """
        n_matmul = self.num_params(include_embedding=False) + self.vocab_size * self.dim
        return 6 * n_matmul + 12 * self.n_layers * self.dim * seq_len


_LLAMA2_7B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000, ffn_dim=11008)
_LLAMA2_13B = dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, vocab_size=32000, ffn_dim=13824)
_LLAMA2_70B = dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, ffn_dim=28672)
PRESETS: dict[str, dict] = {
    "llama2-7b": _LLAMA2_7B,
    "llama2-13b": _LLAMA2_13B,
    "llama2-70b": _LLAMA2_70B,
    # Meditron continued pretraining kept the Llama-2 architectures unchanged.
    "meditron-7b": _LLAMA2_7B,
    "meditron-70b": _LLAMA2_70B,
    # A CPU-sized model with GQA, for the default training run and tests.
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_dim=352, max_seq_len=1024),
}


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        hd = cfg.head_dim
        self.head_dim = hd
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)

    def forward(self, x, *, rope, cu_seqlens=None, max_seqlen=None, position_ids=None):
        # x (batch, seq, dim). Head counts come from the weights' local shapes (-1), so the
        # same code runs on tensor-parallel shards holding a slice of the heads.
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, -1, self.head_dim)
        k = self.wk(x).view(b, s, -1, self.head_dim)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        if cu_seqlens is None:
            o = mk.flash_attention(q, k, v, causal=True, rotary=rope, position_ids=position_ids)
        else:  # packed documents: (batch * seq) tokens delimited by cu_seqlens
            pos = position_ids.reshape(b * s) if position_ids is not None else None
            o = mk.flash_attention(q.reshape(b * s, -1, self.head_dim), k.reshape(b * s, -1, self.head_dim),
                                   v.reshape(b * s, -1, self.head_dim), causal=True, cu_seqlens=cu_seqlens,
                                   max_seqlen=max_seqlen, rotary=rope, position_ids=pos)
        return self.wo(o.reshape(b, s, -1))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x, *, rope, cu_seqlens=None, max_seqlen=None, position_ids=None):
        # x (batch, seq, dim) is the residual stream
        a = self.attention(self.attention_norm(x), rope=rope, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                           position_ids=position_ids)
        # h = x + a, y = rms_norm(h): one pass instead of two. Under autocast the attention output is
        # bf16 while the residual stream stays in its own dtype (float32): the add happens there.
        y, h = self.ffn_norm(a.to(x.dtype), residual=x)
        return h + self.feed_forward(y)


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.head_dim // 2), persistent=False)
        self.init_weights()

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """Initialise parameters and rotary tables in place (after ``to_empty()`` from meta, too).

        Normal(0, 0.02) everywhere; the two projections that write into the residual stream (wo,
        w2) are scaled by 1/sqrt(2 n_layers) so the stream's variance does not grow with depth.
        """
        self.init_rope()
        std, out_std = 0.02, 0.02 / math.sqrt(2 * self.cfg.n_layers)
        with torch.no_grad():
            if self.tok_embeddings is not None:
                nn.init.normal_(self.tok_embeddings.weight, std=std)
            for layer in self.layers.values():
                for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv,
                            layer.feed_forward.w1, layer.feed_forward.w3):
                    nn.init.normal_(lin.weight, std=std)
                nn.init.normal_(layer.attention.wo.weight, std=out_std)
                nn.init.normal_(layer.feed_forward.w2.weight, std=out_std)
                layer.attention_norm.reset_parameters()
                layer.ffn_norm.reset_parameters()
            if self.norm is not None:
                self.norm.reset_parameters()
            if self.output is not None:
                nn.init.normal_(self.output.weight, std=std)

    def init_rope(self) -> None:
        if self.rope_cos.device.type == "meta":
            return
        cos, sin = mk.rotary_cos_sin(self.cfg.max_seq_len, self.cfg.head_dim, self.cfg.rope_theta,
                                     device=self.rope_cos.device)
        self.rope_cos = cos
        self.rope_sin = sin

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) would round the rotary tables too (about 1e-2 rad at position 4096):
        # they are recomputed in float32 instead.
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32:
            self.rope_cos = self.rope_cos.float()
            self.rope_sin = self.rope_sin.float()
            self.init_rope()
        return self

    # ------------------------------------------------------------------ forward
    def hidden_states(self, tokens, *, cu_seqlens=None, max_seqlen=None, position_ids=None):
        """tokens (batch, seq) int64 -> (batch, seq, dim) after the final norm.

        On a pipeline stage without the embedding, ``tokens`` is the previous stage's
        (batch, seq, dim) output, and without the final norm the last layer's output is returned.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        rope = (self.rope_cos, self.rope_sin)
        for layer in self.layers.values():
            h = layer(h, rope=rope, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, position_ids=position_ids)
        return self.norm(h) if self.norm is not None else h

    def forward(self, tokens, *, cu_seqlens=None, max_seqlen=None, position_ids=None, return_hidden=False):
        """tokens (batch, seq) int64 -> logits (batch, seq, vocab).

        return_hidden=True stops before the head and returns the (batch, seq, dim) hidden states
        it would read, for a loss that fuses the head (train/loss.py): a last pipeline stage
        then never materialises the logits.
        """
        h = self.hidden_states(tokens, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, position_ids=position_ids)
        return self.output(h) if self.output is not None and not return_hidden else h

    def loss(self, tokens, targets, *, ignore_index=-100, cu_seqlens=None, max_seqlen=None, position_ids=None):
        """Mean next-token cross-entropy, float32 scalar, without materialising all the logits.

        tokens (batch, seq) int64; targets (batch, seq) int64 with ignore_index where no loss is taken.
        """
        h = self(tokens, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, position_ids=position_ids, return_hidden=True)
        w = self.output.weight
        return mk.fused_linear_cross_entropy(h, w.to(h.dtype), targets, ignore_index=ignore_index)

    # ------------------------------------------------------------------ Hugging Face format
    @classmethod
    def from_hf(cls, path, device=None, dtype=None) -> "Llama":
        """Load a transformers Llama directory (config.json + safetensors, sharded or not)."""
        from .hf import load_hf

        return load_hf(cls, path, device=device, dtype=dtype)

    def save_hf(self, path, max_shard_size: int = 5 * 2**30, dtype=None) -> None:
        """Write config.json + safetensors loadable by transformers.LlamaForCausalLM.from_pretrained."""
        from .hf import save_hf

        save_hf(self, path, max_shard_size=max_shard_size, dtype=dtype)
