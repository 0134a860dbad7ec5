"""Model shapes, parameter counts and FLOPs per token.

Llama-family shapes come from model.LlamaConfig (its presets, its parameter count, its MFU
formula), so the planner and the trainer count the same model the same way. Megatron's GPT
family, needed only to validate against published Megatron runs, is described here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from model import PRESETS, LlamaConfig


@dataclass(frozen=True)
class Architecture:
    """Shape of a decoder-only transformer. Field names follow model.LlamaConfig.

    family "llama": model.LlamaConfig's model (RMSNorm, rotary positions, bias-free SwiGLU MLP
    with 3 matrices, untied head, no dropout); build it with :meth:`from_config`. family "gpt":
    Megatron's GPT (LayerNorm, biases, learned positions, GeLU MLP with 2 matrices, dropout 0.1,
    embedding tied to the head), for validating against Megatron runs.
    """

    name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    max_seq_len: int = 4096
    family: str = "llama"
    # the whole LlamaConfig when built from one: its family switches (biases, tied head, head_dim,
    # sliding window) enter num_params and flops_per_token
    llama: LlamaConfig | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.family not in ("llama", "gpt"):
            raise ValueError(f"model family must be 'llama' or 'gpt', got {self.family!r}")
        self._llama_shape()  # LlamaConfig's checks (positive sizes, heads dividing dim) hold for both families

    def _llama_shape(self) -> LlamaConfig:
        if self.llama is not None:
            return self.llama
        return LlamaConfig(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                           vocab_size=self.vocab_size, ffn_dim=self.ffn_dim, max_seq_len=self.max_seq_len)

    @classmethod
    def from_config(cls, cfg: LlamaConfig, name: str = "custom") -> "Architecture":
        return cls(name=name, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                   ffn_dim=cfg.ffn_dim, vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len, llama=cfg)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | Any, name: str = "custom") -> "Architecture":
        """From a dict or any object with LlamaConfig's attribute names (LlamaConfig's defaults
        fill ffn_dim, vocab_size, max_seq_len); ``family: "gpt"`` describes a Megatron GPT."""
        get = d.get if isinstance(d, Mapping) else (lambda k, default=None: getattr(d, k, default))
        missing = [k for k in ("dim", "n_layers", "n_heads") if get(k) is None]
        if missing:
            raise ValueError(f"model dict is missing {missing}; it needs dim, n_layers, n_heads "
                             "and optionally n_kv_heads, ffn_dim, vocab_size, max_seq_len, family")
        name = str(get("name", name) or name)
        fields = {k: get(k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size",
                                       "max_seq_len") if get(k) is not None}
        family = get("family", "llama")
        if family == "llama":
            return cls.from_config(LlamaConfig(**fields), name)
        fields.setdefault("n_kv_heads", fields["n_heads"])
        return cls(name=name, family=family, **{"ffn_dim": 11008, "vocab_size": 32000, **fields})

    @property
    def config(self) -> LlamaConfig:
        """The model.LlamaConfig of a llama-family shape."""
        if self.gpt:
            raise ValueError(f"{self.name} is a Megatron GPT shape, not a LlamaConfig")
        return self._llama_shape()

    @property
    def head_dim(self) -> int:
        return self.llama.head_dim if self.llama is not None else self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def gpt(self) -> bool:
        return self.family == "gpt"

    # Parameters, split the way the layers own them (tensor parallelism shards them this way).
    @property
    def qkv_params(self) -> int:
        return self.dim * (self.dim + 2 * self.kv_dim)

    @property
    def out_params(self) -> int:
        return self.dim * self.dim

    @property
    def mlp_in_params(self) -> int:  # gate and up (SwiGLU) or fc1 (GeLU): column-parallel
        return (1 if self.gpt else 2) * self.dim * self.ffn_dim

    @property
    def mlp_out_params(self) -> int:  # down / fc2: row-parallel
        return self.dim * self.ffn_dim

    @property
    def layer_matmul_params(self) -> int:
        return self.qkv_params + self.out_params + self.mlp_in_params + self.mlp_out_params

    @property
    def layer_params(self) -> int:
        if self.gpt:  # biases of the four linears (3h + h + f + h) and two LayerNorms (4h)
            return self.layer_matmul_params + 9 * self.dim + self.ffn_dim
        return self.layer_matmul_params + 2 * self.dim  # two RMSNorm weights

    @property
    def embedding_params(self) -> int:
        pos = self.max_seq_len * self.dim if self.gpt else 0
        return self.vocab_size * self.dim + pos

    @property
    def head_params(self) -> int:
        """Output projection weights (a separate tensor unless tied to the embedding)."""
        return 0 if self.gpt else self.vocab_size * self.dim

    @property
    def n_params(self) -> int:
        """N_total: every parameter once (a tied embedding counts once)."""
        if not self.gpt:
            return self.config.num_params()
        return self.n_layers * self.layer_params + self.embedding_params + 2 * self.dim  # + final LayerNorm

    def model_flops_per_token(self, seq_len: int) -> float:
        """The primary MFU formula, 6 N_non_embedding + 12 n_layers dim seq (LlamaConfig.flops_per_token);
        for GPT N_non_embedding counts the tied head as a matmul and leaves out both tables."""
        if not self.gpt:
            return self.config.flops_per_token(seq_len)
        n_matmul = self.n_params - self.embedding_params + self.vocab_size * self.dim
        return 6 * n_matmul + 12 * self.n_layers * self.dim * seq_len

    def paper_flops_per_token(self) -> float:
        """The Meditron paper's formula: 6 N_total."""
        return 6 * self.n_params


def _gpt(name: str, heads: int, dim: int, layers: int) -> Architecture:
    # Megatron's GPT runs: 4h GeLU MLP, vocabulary 51,200, sequence 2048 (Narayanan et al. 2021 §5.1).
    return Architecture(name, dim, layers, heads, heads, 4 * dim, 51200, 2048, "gpt")


ARCHITECTURES: dict[str, Architecture] = {
    **{name: Architecture.from_config(LlamaConfig.from_name(name), name) for name in PRESETS},
    # Megatron-LM's GPT family, for the published runs: Narayanan et al. 2021 Table 1 (heads,
    # hidden, layers) and Korthikanti et al. 2022 Table 3 (22B and GPT-3 175B).
    **{name: _gpt(name, heads, dim, layers) for name, heads, dim, layers in (
        ("gpt-1.7b", 24, 2304, 24), ("gpt-3.6b", 32, 3072, 30), ("gpt-7.5b", 32, 4096, 36),
        ("gpt-18b", 48, 6144, 40), ("gpt-22b", 64, 6144, 48), ("gpt-39b", 64, 8192, 48),
        ("gpt-76b", 80, 10240, 60), ("gpt-145b", 96, 12288, 80), ("gpt3-175b", 96, 12288, 96),
        ("gpt-310b", 128, 16384, 96), ("gpt-530b", 128, 20480, 105), ("gpt-1t", 160, 25600, 128))},
}


def get_architecture(model: str | Mapping[str, Any] | Architecture | LlamaConfig | Any) -> Architecture:
    """A preset name, an Architecture, a LlamaConfig, a dict, or an object with LlamaConfig's attribute names."""
    if isinstance(model, Architecture):
        return model
    if isinstance(model, LlamaConfig):
        return Architecture.from_config(model)
    if isinstance(model, str):
        if model not in ARCHITECTURES:
            raise ValueError(f"unknown model {model!r}; choose one of {sorted(ARCHITECTURES)} "
                             "or pass a JSON dict with dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab_size")
        return ARCHITECTURES[model]
    return Architecture.from_dict(model)
