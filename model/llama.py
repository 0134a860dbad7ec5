"""The Llama-family decoder on the meditron_kernels ops, in one file.

Pre-norm decoder: RMSNorm, grouped-query attention with rotary positions (fused into the
attention op), SwiGLU MLP. Llama-2/3, Mistral, Qwen2 and Qwen3 are this model with different
LlamaConfig switches (biases, q/k norms, head_dim, tied head, rope scaling, sliding window). Every op goes through meditron_kernels, so a backend switch
(``meditron_kernels.use_backend`` or MEDITRON_KERNELS_BACKEND) changes all of them.

The model stays plain nn: tensor, sequence and pipeline parallelism, FSDP, activation
checkpointing and compile are applied from outside (train/parallelize.py). Layers sit in a
ModuleDict keyed by index so a pipeline stage can delete the ones it does not own, and the
embedding, final norm and head may be None on stages that do not hold them.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Iterable, Sequence

import torch
from torch import nn

import meditron_kernels as mk
from meditron_kernels.nn import RMSNorm, SwiGLU, init_normal_
from meditron_kernels.packing import document_positions

INIT_STD = 0.02  # of every projection that reads the residual stream, and of the embedding


MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""The transformers families this config expresses (its ``model_type``; model/hf.py maps each)."""
LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' names, per layer
MLP_KINDS = ("swiglu",)


@dataclasses.dataclass
class LlamaConfig:
    """The decoder's shape and its family switches. The first fields are Llama-2's; every switch
    defaults to Llama-2's choice, so ``LlamaConfig(dim=..., n_layers=..., ...)`` is a Llama-2.

    Families differ in data, not in code paths: Llama-3 is a rope scaling (and, at 1B/3B, tied
    embeddings), Qwen2 adds q/k/v biases, Qwen3 a per-head RMSNorm of q and k and a head_dim
    decoupled from dim / n_heads, Mistral a sliding window. Gemma-3 and Apertus will need the
    switches marked "not yet": an MLP kind, a norm weight offset, extra norms and a per-layer rope base.
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None: as many as n_heads (no GQA)
    vocab_size: int = 32000
    ffn_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    model_type: str = "llama"
    """The transformers family save_hf writes (model_type and architecture class), one of MODEL_TYPES."""
    head_dim: int | None = None
    """Width of one attention head; None: dim // n_heads. Qwen3 and Gemma-3 set it apart from dim / n_heads."""
    qkv_bias: bool = False
    """Biases on the q, k and v projections (Qwen2; Llama's attention_bias also sets out_bias)."""
    out_bias: bool = False
    """A bias on the attention output projection."""
    qk_norm: bool = False
    """RMSNorm over head_dim of every query and key head, before rotary (Qwen3, Gemma-3, Apertus)."""
    tie_embeddings: bool = False
    """The output head is the input embedding matrix (Llama-3.2 1B/3B, small Qwens, Gemma)."""
    rope_scaling: dict | None = None
    """transformers' rope_parameters without rope_theta, e.g. {"rope_type": "llama3", "factor": 8.0, ...};
    None: plain rotary. The types mk.rotary_cos_sin implements (default, linear, llama3) are accepted."""
    sliding_window: int | None = None
    """Keys a query of a sliding layer sees, itself included (transformers' sliding_window). None: none."""
    layer_types: tuple[str, ...] | None = None
    """Per layer, "full_attention" or "sliding_attention". None: every layer sliding when
    sliding_window is set (Mistral), else every layer full."""
    mlp: str = "swiglu"
    """The MLP kind, one of MLP_KINDS. Not yet: "geglu" (Gemma-3), "xielu" (Apertus, ungated)."""
    norm_offset: float = 0.0
    """RMSNorm scales by (offset + weight). Not yet: 1.0 (Gemma's zero-centred norm weights)."""
    post_norms: bool = False
    """RMSNorms on the attention and MLP outputs before the residual add. Not yet (Gemma-3)."""
    local_rope_theta: float | None = None
    """Rope base of sliding layers, unscaled; None: rope_theta. Not yet (Gemma-3: 10k local, 1M global)."""

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "max_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {v!r}")
        derived = self.head_dim is None
        if derived:
            if self.dim % self.n_heads:
                raise ValueError(f"LlamaConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            self.head_dim = self.dim // self.n_heads
        elif isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ValueError(f"LlamaConfig.head_dim must be a positive int or None, got {self.head_dim!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LlamaConfig.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            given = "dim / n_heads = " if derived else ""
            raise ValueError(f"LlamaConfig head_dim = {given}{self.head_dim} must be even for rotary")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"LlamaConfig.model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        for name in ("qkv_bias", "out_bias", "qk_norm", "tie_embeddings", "post_norms"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"LlamaConfig.{name} must be a bool, got {getattr(self, name)!r}")
        self.rope_scaling = _rope_scaling(self.rope_scaling)
        mk._validate.rope_scaling(self.rope_scaling, self.rope_theta, mk.reference.ROPE_TYPES)
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool)
                                                or not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(f"LlamaConfig.sliding_window must be a positive int or None, got {self.sliding_window!r}")
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)  # a list after a JSON round trip
            if len(self.layer_types) != self.n_layers or any(t not in LAYER_TYPES for t in self.layer_types):
                raise ValueError(f"LlamaConfig.layer_types must list one of {LAYER_TYPES} for each of the "
                                 f"{self.n_layers} layers, got {self.layer_types!r}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("LlamaConfig.layer_types has sliding_attention layers but sliding_window is None")
        if self.mlp not in MLP_KINDS:
            raise NotImplementedError(f"LlamaConfig.mlp {self.mlp!r} is not implemented; supported: {MLP_KINDS}")
        for name, neutral in (("norm_offset", 0.0), ("post_norms", False), ("local_rope_theta", None)):
            if getattr(self, name) != neutral:
                raise NotImplementedError(f"LlamaConfig.{name}={getattr(self, name)!r} is not implemented yet "
                                          f"(it is for Gemma-3); use {neutral!r}")

    def window(self, layer: int) -> int | None:
        """Keys a query of layer ``layer`` sees, itself included; None: all before it (global attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    @classmethod
    def from_name(cls, name: str) -> "LlamaConfig":
        """One of PRESETS, by exact name."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count (the input embedding and output head are the 'embedding' part; tied, they
        count once)."""
        d, hd = self.dim, self.head_dim
        q, kv = self.n_heads * hd, self.n_kv_heads * hd
        attention = 2 * d * q + 2 * d * kv
        attention += (q + 2 * kv) * self.qkv_bias + d * self.out_bias + 2 * hd * self.qk_norm
        per_layer = attention + 3 * d * self.ffn_dim + 2 * d
        n = self.n_layers * per_layer + d
        if include_embedding:
            n += (1 if self.tie_embeddings else 2) * self.vocab_size * d
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, the primary MFU formula: 6 N_non_embedding + 12 n_layers dim seq.

        6 N counts the forward and backward matmuls of every weight (the head included, tied or
        not: it is a matmul, while the embedding is a lookup); 12 L d s counts the attention score
        and value matmuls, forward and backward, without causal halving, with d the query width
        (n_heads x head_dim) and s the keys a query sees (at most sliding_window on a sliding layer).
        """
        n_matmul = self.num_params(include_embedding=False) + self.vocab_size * self.dim
        keys = sum(min(seq_len, self.window(i) or seq_len) for i in range(self.n_layers))
        return 6 * n_matmul + 12 * self.n_heads * self.head_dim * keys


def _rope_scaling(scaling) -> dict | None:
    """transformers' rope_parameters (or legacy rope_scaling) -> our rope_scaling: None for plain
    rotary, else the dict without rope_theta (a field of its own); an unimplemented type is refused
    by name."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise TypeError(f"LlamaConfig.rope_scaling must be a dict of rope parameters or None, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in mk.reference.ROPE_TYPES:
        raise NotImplementedError(f"rope scaling {kind!r} is not implemented; supported: "
                                  f"{', '.join(mk.reference.ROPE_TYPES)}")
    if kind == "default":
        return None
    return {"rope_type": kind, **{k: v for k, v in scaling.items() if k not in ("rope_theta", "type", "rope_type")}}


_LLAMA2_7B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000, ffn_dim=11008)
_LLAMA2_13B = dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, vocab_size=32000, ffn_dim=13824)
_LLAMA2_70B = dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, ffn_dim=28672)
# Llama-3.1 (and 3.3): rope base 500k stretched 8x beyond the 8k it was pretrained at
_LLAMA31_ROPE = dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
_LLAMA31_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim=14336,
                   max_seq_len=131072, **_LLAMA31_ROPE)
_LLAMA31_70B = dict(_LLAMA31_8B, dim=8192, n_layers=80, n_heads=64, ffn_dim=28672)
# Llama-3.2 1B/3B: tied embeddings, rope factor 32
_LLAMA32 = dict(n_kv_heads=8, vocab_size=128256, ffn_dim=8192, max_seq_len=131072, tie_embeddings=True,
                rope_theta=500000.0, rope_scaling=dict(_LLAMA31_ROPE["rope_scaling"], factor=32.0))
PRESETS: dict[str, dict] = {
    "llama2-7b": _LLAMA2_7B,
    "llama2-13b": _LLAMA2_13B,
    "llama2-70b": _LLAMA2_70B,
    # Meditron continued pretraining kept the Llama-2 architectures unchanged.
    "meditron-7b": _LLAMA2_7B,
    "meditron-70b": _LLAMA2_70B,
    # A CPU-sized model with GQA, for the default training run and tests.
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_dim=352, max_seq_len=1024),
    # The published config.json of each, field for field (tests/model/test_families.py counts
    # their parameters against transformers').
    "llama3.1-8b": _LLAMA31_8B,
    "llama3.1-70b": _LLAMA31_70B,
    "llama3.2-1b": dict(_LLAMA32, dim=2048, n_layers=16, n_heads=32),
    "llama3.2-3b": dict(_LLAMA32, dim=3072, n_layers=28, n_heads=24),
    # Meditron-3 continued pretraining kept the Llama-3.1 architectures unchanged.
    "meditron3-8b": _LLAMA31_8B,
    "meditron3-70b": _LLAMA31_70B,
    "qwen2.5-7b": dict(model_type="qwen2", dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, vocab_size=152064,
                       ffn_dim=18944, norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=131072, qkv_bias=True),
    "qwen3-8b": dict(model_type="qwen3", dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128,
                     vocab_size=151936, ffn_dim=12288, norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=40960,
                     qk_norm=True),
    # v0.2 and later dropped v0.1's 4096-token sliding window (sliding_window: null)
    "mistral-7b-v0.3": dict(model_type="mistral", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=32768,
                            ffn_dim=14336, rope_theta=1000000.0, max_seq_len=32768),
}


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_id: int = 0):
        super().__init__()
        hd = cfg.head_dim
        self.head_dim = hd
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=cfg.out_bias)
        # per-head RMSNorm of queries and keys, one weight shared by all heads (Qwen3)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        w = cfg.window(layer_id)
        # transformers' sliding_window W counts the query's own key: W - 1 keys before it
        self.window = (w - 1, 0) if w is not None else None

    def init_weights(self, out_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv):
            init_normal_(lin.weight, INIT_STD)
        init_normal_(self.wo.weight, out_std)
        for lin in (self.wq, self.wk, self.wv, self.wo):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()

    def forward(self, x, *, rope, cu_seqlens=None, max_seqlen=None, position_ids=None, cache=None):
        # x (batch, seq, dim). Head counts come from the weights' local shapes (-1), so the
        # same code runs on tensor-parallel shards holding a slice of the heads.
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, -1, self.head_dim)
        k = self.wk(x).view(b, s, -1, self.head_dim)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # the window only where the layer has one, so global layers run on every backend
        local = {"window": self.window} if self.window is not None else {}
        if cache is not None:
            # Rotated here, once, so that the cache holds rotated keys and decoding never re-rotates them.
            q, k = mk.apply_rotary(q, k, rope[0], rope[1], position_ids)
            o = cache.attend(q, k, v, cu_seqlens, max_seqlen, **local)
        elif cu_seqlens is None:
            o = mk.flash_attention(q, k, v, causal=True, rotary=rope, position_ids=position_ids, **local)
        else:  # packed documents: (batch * seq) tokens delimited by cu_seqlens
            pos = position_ids.reshape(b * s) if position_ids is not None else None
            o = mk.flash_attention(q.reshape(b * s, -1, self.head_dim), k.reshape(b * s, -1, self.head_dim),
                                   v.reshape(b * s, -1, self.head_dim), causal=True, cu_seqlens=cu_seqlens,
                                   max_seqlen=max_seqlen, rotary=rope, position_ids=pos, **local)
        return self.wo(o.reshape(b, s, -1))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.dim, cfg.ffn_dim)

    def init_weights(self, out_std: float) -> None:
        """out_std: of the projections whose output is added to the residual stream (wo, w2) and
        of w3, whose product with silu(w1 x) feeds w2."""
        self.attention_norm.reset_parameters()
        self.attention.init_weights(out_std)
        self.ffn_norm.reset_parameters()
        self.feed_forward.reset_parameters(init_std=out_std)

    def forward(self, x, *, rope, cu_seqlens=None, max_seqlen=None, position_ids=None, cache=None):
        # x (batch, seq, dim) is the residual stream; cache: a KVCache (inference)
        a = self.attention(self.attention_norm(x), rope=rope, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                           position_ids=position_ids, cache=cache.layer(self.layer_id) if cache is not None else None)
        # h = x + a, y = rms_norm(h): one pass instead of two. Under autocast the attention output is
        # bf16 while the residual stream stays in its own dtype (float32): the add happens there.
        y, h = self.ffn_norm(a.to(x.dtype), residual=x)
        return h + self.feed_forward(y)


class KVCache:
    """Keys and values of every layer for ``batch`` sequences of up to ``capacity`` tokens (inference).

    Preallocated once, in the model's dtype and GQA-sized (n_kv_heads, not n_heads): layer i's keys
    are ``k[i]`` (batch, capacity, n_kv_heads, head_dim). Keys are stored rotated. ``lengths[b]``
    tokens of sequence b are cached. A step is announced first: ``prefill`` packs the prompts back
    to back (no padding), ``decode`` feeds one token per sequence; each returns the arguments the
    model's forward takes for that step.
    """

    def __init__(self, cfg: LlamaConfig, batch: int, capacity: int, dtype: torch.dtype, device=None):
        shape = (cfg.n_layers, batch, capacity, cfg.n_kv_heads, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self._rows = self._slots = self._take = None  # where this step's new keys go
        self._seqlens_k = None  # decode: keys each query sees
        self._span = 0  # decode: cache rows any sequence uses

    def prefill(self, lengths: Sequence[int]) -> dict:
        """Empty cache, prompts of ``lengths`` tokens packed into one (1, sum(lengths)) row."""
        dev = self.lengths.device
        n = torch.tensor(lengths, dtype=torch.int32, device=dev)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=dev)
        cu[1:] = n.cumsum(0)
        self._rows = torch.repeat_interleave(torch.arange(len(lengths), device=dev), n.long())
        self._slots = document_positions(cu, int(cu[-1]))
        self._take = None
        self.lengths = n
        return dict(cu_seqlens=cu, max_seqlen=max(lengths), position_ids=self._slots[None])

    def decode(self, active: torch.Tensor) -> dict:
        """One token per sequence, (batch, 1); the cache grows where ``active`` (batch,) bool is set.
        Inactive sequences still run (their output is ignored) but write nothing."""
        pos = self.lengths.clamp(max=self.capacity - 1)
        self._take = active.nonzero()[:, 0]
        self._rows, self._slots = self._take, pos[self._take].long()
        self.lengths = self.lengths + active.to(torch.int32)
        self._seqlens_k = self.lengths
        self._span = int(self.lengths.max())
        return dict(position_ids=pos[:, None].long())

    def layer(self, i: int) -> "_LayerCache":
        return _LayerCache(self, i)


class _LayerCache:
    """One layer's view of a KVCache: stores this step's keys and values and attends."""

    def __init__(self, cache: KVCache, i: int):
        self.cache, self.k, self.v = cache, cache.k[i], cache.v[i]

    def attend(self, q, k, v, cu_seqlens, max_seqlen, window=None):
        # q (batch, seq, n_heads, d); k, v (batch, seq, n_kv_heads, d), rotated -> (batch, seq, n_heads, d)
        c = self.cache
        b, s, _, d = q.shape
        k, v = k.reshape(b * s, -1, d), v.reshape(b * s, -1, d)
        if c._take is not None:
            k, v = k[c._take], v[c._take]
        self.k[c._rows, c._slots] = k
        self.v[c._rows, c._slots] = v
        if cu_seqlens is not None:  # prefill: a prompt's keys are exactly the fresh ones
            o = mk.flash_attention(q.reshape(b * s, -1, d), k, v, causal=True, cu_seqlens=cu_seqlens,
                                   max_seqlen=max_seqlen, window=window)
        else:  # decode: the new query row against the cache, each sequence its own length
            o = mk.flash_attention(q, self.k[:, :c._span], self.v[:, :c._span], causal=True,
                                   seqlens_k=c._seqlens_k, window=window)
        return o.reshape(b, s, -1, d)


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._tie()
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.head_dim // 2), persistent=False)
        self.init_weights()

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """Initialise parameters and rotary tables in place (after ``to_empty()`` from meta, too).

        The policy: normal, truncated at 3 std (meditron_kernels.nn.init_normal_), std INIT_STD
        for the embedding, the head and the projections that read the residual stream (wq, wk,
        wv, w1); wo, w2 and w3 get INIT_STD / sqrt(2 n_layers), so the residual stream's variance
        does not grow with depth; norm weights are ones. Each unit (see ``units``) is
        initialised on its own by ``init_unit``, which is how every parallel layout builds the
        same weights (train/parallelize.init_weights).
        """
        self.init_rope()
        for name in self.units():
            self.init_unit(name)

    def units(self) -> list[str]:
        """The initialisation units this model (or pipeline stage) holds, in order:
        tok_embeddings, layers.<i>, norm, output (not when it is the tied embedding)."""
        names = ["tok_embeddings"] if self.tok_embeddings is not None else []
        names += [f"layers.{k}" for k in self.layers.keys()]
        tied = self.cfg.tie_embeddings and self.tok_embeddings is not None
        return names + [n for n in ("norm", "output") if getattr(self, n) is not None and not (n == "output" and tied)]

    def _tie(self) -> None:
        # One Parameter in both modules. Rebuilt after every _apply: to_empty() from meta gives
        # each module a Parameter of its own.
        if self.cfg.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_unit(self, name: str) -> None:
        """Initialise one unit's parameters in place (the policy of ``init_weights``)."""
        module = self.get_submodule(name)
        if name in ("tok_embeddings", "output"):
            init_normal_(module.weight, INIT_STD)
        elif name == "norm":
            module.reset_parameters()
        else:
            module.init_weights(INIT_STD / math.sqrt(2 * self.cfg.n_layers))

    def init_rope(self) -> None:
        if self.rope_cos.device.type == "meta":
            return
        cos, sin = mk.rotary_cos_sin(self.cfg.max_seq_len, self.cfg.head_dim, self.cfg.rope_theta,
                                     device=self.rope_cos.device, scaling=self.cfg.rope_scaling)
        self.rope_cos = cos
        self.rope_sin = sin

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) would round the rotary tables too (about 1e-2 rad at position 4096):
        # they are recomputed in float32 instead.
        super()._apply(fn, recurse)
        self._tie()
        if self.rope_cos.dtype != torch.float32:
            self.rope_cos = self.rope_cos.float()
            self.rope_sin = self.rope_sin.float()
            self.init_rope()
        return self

    # ------------------------------------------------------------------ forward
    def hidden_states(self, tokens, *, cu_seqlens=None, max_seqlen=None, position_ids=None, cache=None):
        """tokens (batch, seq) int64 -> (batch, seq, dim) after the final norm.

        On a pipeline stage without the embedding, ``tokens`` is the previous stage's
        (batch, seq, dim) output, and without the final norm the last layer's output is returned.
        cache: a KVCache whose step (KVCache.prefill / KVCache.decode) made these arguments.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        rope = (self.rope_cos, self.rope_sin)
        for layer in self.layers.values():
            h = layer(h, rope=rope, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, position_ids=position_ids,
                      cache=cache)
        return self.norm(h) if self.norm is not None else h

    def forward(self, tokens, *, cu_seqlens=None, max_seqlen=None, position_ids=None, cache=None,
                return_hidden=False):
        """tokens (batch, seq) int64 -> logits (batch, seq, vocab).

        return_hidden=True stops before the head and returns the (batch, seq, dim) hidden states
        it would read, for a loss that fuses the head (train/loss.py): a last pipeline stage
        then never materialises the logits.
        """
        h = self.hidden_states(tokens, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, position_ids=position_ids,
                               cache=cache)
        return self.output(h) if self.output is not None and not return_hidden else h

    def loss(self, tokens, targets, *, ignore_index=-100, cu_seqlens=None, max_seqlen=None, position_ids=None):
        """Mean next-token cross-entropy, float32 scalar, without materialising all the logits.

        tokens (batch, seq) int64; targets (batch, seq) int64 with ignore_index where no loss is taken.
        """
        h = self(tokens, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, position_ids=position_ids, return_hidden=True)
        w = self.output.weight
        return mk.fused_linear_cross_entropy(h, w.to(h.dtype), targets, ignore_index=ignore_index)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, stop_ids: Iterable[int] = (), seed: int | None = None,
                 progress: bool | None = None) -> list[list[int]]:
        """Continue every prompt (a list of token ids; any lengths, in one batch) -> the new ids of each.

        The prompts are prefilled together, packed without padding, into a KV cache; then every
        sequence decodes one token per step. temperature 0 is greedy; otherwise the softmax of
        logits / temperature is sampled from its top-p nucleus (the fewest most likely tokens whose
        probability reaches top_p). A sequence stops after a token in stop_ids (which is kept), after
        max_new_tokens, or when prompt and continuation fill the context (cfg.max_seq_len; a
        UserWarning says so in advance). seed makes sampling reproducible (a torch.Generator on the
        model's device); None draws from the global generator. progress: a tqdm bar; None shows one
        for 256 or more new tokens.
        """
        if self.tok_embeddings is None or self.output is None:
            raise ValueError("generate needs the whole model (this one lacks its embedding or its output head)")
        prompts, stop = self._check_generate(prompts, max_new_tokens, temperature, top_p, stop_ids, seed)
        ctx = self.cfg.max_seq_len
        lengths = [len(p) for p in prompts]
        budget = [min(max_new_tokens, ctx - n) for n in lengths]
        cut = [i for i, m in enumerate(budget) if m < max_new_tokens]
        if cut:  # said once, up front, as transformers does; the sequence may still stop earlier at a stop id
            more = f" (and {len(cut) - 1} more prompts)" if len(cut) > 1 else ""
            warnings.warn(f"prompts[{cut[0]}] has {lengths[cut[0]]} tokens: the context (max_seq_len={ctx}) leaves "
                          f"room for {budget[cut[0]]} of max_new_tokens={max_new_tokens}, and generation stops "
                          f"there{more}", stacklevel=2)
        device, dtype = self.output.weight.device, self.output.weight.dtype
        # the last new token is returned, never fed back: it needs no cache row
        cache = KVCache(self.cfg, len(prompts), max(n + m - 1 for n, m in zip(lengths, budget)), dtype, device)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
        from tqdm.auto import tqdm

        bar = tqdm(total=max(budget), desc="generate", unit="tok", leave=False,
                   disable=(not progress) if progress is not None else (max(budget) < 256 or None))
        try:
            tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)[None]
            step = cache.prefill(lengths)
            h = self.hidden_states(tokens, cache=cache, **step)[0, step["cu_seqlens"][1:].long() - 1]
            out: list[list[int]] = [[] for _ in prompts]
            active = [True] * len(prompts)
            while True:
                nxt = _sample(self.output(h).float(), temperature, top_p, generator)  # (batch,)
                for i, t in enumerate(nxt.tolist()):
                    if active[i]:
                        out[i].append(t)
                        active[i] = t not in stop and len(out[i]) < budget[i]
                bar.update(1)
                if not any(active):
                    return out
                step = cache.decode(torch.tensor(active, device=device))
                h = self.hidden_states(nxt[:, None], cache=cache, **step)[:, 0]
        finally:
            bar.close()

    def _check_generate(self, prompts, max_new_tokens, temperature, top_p, stop_ids, seed):
        if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence) or not prompts:
            raise TypeError("prompts must be a non-empty list of token-id lists")
        vocab, ctx = self.cfg.vocab_size, self.cfg.max_seq_len
        clean = []
        for i, p in enumerate(prompts):
            if isinstance(p, (str, torch.Tensor)) or not isinstance(p, Sequence):
                raise TypeError(f"prompts[{i}] must be a list of token ids, got {type(p).__name__}")
            if not p:
                raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token (e.g. BOS)")
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in p):
                raise ValueError(f"prompts[{i}] must hold ints in [0, vocab_size={vocab})")
            if len(p) >= ctx:
                raise ValueError(f"prompts[{i}] has {len(p)} tokens, but the context holds {ctx}: a prompt may "
                                 f"have at most {ctx - 1} so that one token can be generated")
            clean.append(list(p))
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if isinstance(stop_ids, int):
            stop_ids = (stop_ids,)
        stop = set(stop_ids)
        if any(isinstance(t, bool) or not isinstance(t, int) for t in stop):
            raise TypeError(f"stop_ids must be token ids (ints), got {sorted(stop, key=str)}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        return clean, stop

    # ------------------------------------------------------------------ Hugging Face format
    @classmethod
    def from_hf(cls, path, device=None, dtype=None) -> "Llama":
        """Load a transformers directory (config.json + safetensors, sharded or not) of model_type
        llama (Llama-2/3, llama3 rope, tied or not), mistral, qwen2 or qwen3; others are refused by name."""
        from .hf import load_hf

        return load_hf(cls, path, device=device, dtype=dtype)

    def save_hf(self, path, max_shard_size: int = 5 * 2**30, dtype=None, bos_token_id: int | None = None,
                eos_token_id: int | None = None) -> None:
        """Write config.json + safetensors of cfg.model_type's family, loadable by its transformers
        class (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM), with the
        tokenizer's special ids when given (train.export passes them)."""
        from .hf import save_hf

        save_hf(self, path, max_shard_size=max_shard_size, dtype=dtype, bos_token_id=bos_token_id,
                eos_token_id=eos_token_id)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """logits (batch, vocab) float32 -> token ids (batch,)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        probs, order = probs.sort(dim=-1, descending=True)
        # keep a token while the more likely ones before it hold less than top_p (the first always)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
        return order.gather(-1, torch.multinomial(probs, 1, generator=generator))[:, 0]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
