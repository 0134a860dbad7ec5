"""Hugging Face (transformers) checkpoints of the Llama family and its cousins (Mistral, Qwen2,
Qwen3): config.json + safetensors, single or sharded.

The families share transformers' tensor names; what differs is config.json, mapped here to
LlamaConfig's switches and back, so that save_hf writes the family it loaded (same model_type and
architecture class).

Loading builds the model on the meta device, allocates it once with ``to_empty`` and copies
each tensor in from the memory-mapped safetensors files one at a time, so a checkpoint loads
in about its own size of memory.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Iterator, Mapping, Sequence

import torch

from .llama import MODEL_TYPES, Llama, LlamaConfig

# the transformers class of each model_type (LlamaConfig.model_type)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
assert set(ARCHITECTURES) == set(MODEL_TYPES)

# our name <- transformers' name, for per-layer tensors
_LAYER_MAP = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.wo.bias": "self_attn.o_proj.bias",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def to_hf_name(name: str) -> str:
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    return _TOP_MAP[name]


def config_from_hf(cfg: dict) -> LlamaConfig:
    """transformers' config.json (a dict) -> LlamaConfig. Other model_types, and features the model
    does not implement (yarn or longrope rope scaling, MLP biases, another activation), are refused
    by name."""
    family = cfg.get("model_type", "llama")
    if family not in ARCHITECTURES:
        raise ValueError(f"config.json: model_type {family!r} is not supported; supported: {', '.join(MODEL_TYPES)}")
    # transformers 5 keeps rope_theta and the scaling in rope_parameters; 4.x has rope_theta and rope_scaling
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if cfg.get("mlp_bias"):
        raise NotImplementedError("config.json: mlp_bias=true is not supported (no family here has MLP biases)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(f"config.json: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    heads = cfg["num_attention_heads"]
    # transformers' Qwen3Config defaults head_dim to 128; the others to hidden_size / heads
    head_dim = cfg.get("head_dim") or (128 if family == "qwen3" else cfg["hidden_size"] // heads)
    bias = bool(cfg.get("attention_bias", False))
    window, layer_types = None, None
    if family == "mistral":  # every layer, when set
        window = cfg.get("sliding_window")
    elif family in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        window = cfg.get("sliding_window")
        # transformers' rule when config.json does not list the layers: the first max_window_layers are full
        layer_types = cfg.get("layer_types") or [
            "sliding_attention" if i >= cfg.get("max_window_layers", 28) else "full_attention"
            for i in range(cfg["num_hidden_layers"])]
    return LlamaConfig(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads, vocab_size=cfg["vocab_size"],
        ffn_dim=cfg["intermediate_size"], norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), rope_theta=theta,
        max_seq_len=cfg.get("max_position_embeddings", 4096), model_type=family, head_dim=head_dim,
        # Qwen2 always has q/k/v biases (and no output bias); Llama's and Qwen3's attention_bias sets all four
        qkv_bias=family == "qwen2" or (bias and family in ("llama", "qwen3")),
        out_bias=bias and family in ("llama", "qwen3"), qk_norm=family == "qwen3",
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), rope_scaling=rope or None,
        sliding_window=window, layer_types=layer_types,
    )


def _inexpressible(cfg: LlamaConfig) -> list[str]:
    """The switches of ``cfg`` that its model_type's transformers class does not have."""
    family, problems = cfg.model_type, []
    bias = {"llama": None, "qwen3": None, "qwen2": (True, False), "mistral": (False, False)}[family]
    if bias is None and cfg.qkv_bias != cfg.out_bias:
        problems.append(f"qkv_bias={cfg.qkv_bias} with out_bias={cfg.out_bias} (its attention_bias sets both)")
    elif bias is not None and (cfg.qkv_bias, cfg.out_bias) != bias:
        problems.append(f"qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias} (it has {bias[0]}, {bias[1]})")
    if cfg.qk_norm != (family == "qwen3"):
        problems.append(f"qk_norm={cfg.qk_norm}")
    if family == "qwen2" and cfg.head_dim * cfg.n_heads != cfg.dim:
        problems.append(f"head_dim={cfg.head_dim} != dim / n_heads")
    if cfg.sliding_window is not None:
        if family == "llama":
            problems.append(f"sliding_window={cfg.sliding_window}")
        elif family == "mistral" and cfg.layer_types and "full_attention" in cfg.layer_types:
            problems.append("full_attention layers beside sliding ones")
    return problems


def config_to_hf(cfg: LlamaConfig, dtype: torch.dtype, bos_token_id: int | None = None,
                 eos_token_id: int | None = None) -> dict:
    """transformers' config.json for cfg.model_type. The special ids belong to the tokenizer, not the
    model: None (unknown) is written as null rather than guessed."""
    family = cfg.model_type
    problems = _inexpressible(cfg)
    if problems:
        raise ValueError(f"save_hf: model_type {family!r} cannot express {'; '.join(problems)}")
    scaling = cfg.rope_scaling or {"rope_type": "default"}
    out = {
        "architectures": [ARCHITECTURES[family]], "model_type": family, "hidden_act": "silu",
        "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        # rope_parameters for transformers 5; rope_theta and rope_scaling for 4.x
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
        "rope_parameters": {**scaling, "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "torch_dtype": str(dtype).removeprefix("torch."),
        "dtype": str(dtype).removeprefix("torch."),
    }
    if family in ("llama", "qwen3"):
        out["attention_bias"] = cfg.qkv_bias
    if family == "llama":
        out["mlp_bias"] = False
    if family == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if family in ("qwen2", "qwen3"):
        types = [("sliding_attention" if cfg.window(i) else "full_attention") for i in range(cfg.n_layers)]
        out.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                   layer_types=types, max_window_layers=types.index("sliding_attention")
                   if "sliding_attention" in types else cfg.n_layers)
    return out


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return ["model.safetensors"]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                            "(PyTorch .bin checkpoints are not supported; convert them to safetensors)")


def iter_hf_tensors(path, shapes: Mapping[str, Sequence[int]], *,
                    strict: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors that ``shapes`` names, read from a Hugging Face directory (config.json +
    safetensors, sharded or not), as (our parameter name, tensor), one at a time from the
    memory-mapped files, each file opened once.

    shapes: our parameter name -> the shape it must have (a model's parameters, or a pipeline
    stage's: tensor-parallel parameters give their full shape). When config.json ties the
    embeddings and the checkpoint has no lm_head, ``output.weight`` is the embedding. A wanted
    tensor that is missing or misshapen is a ValueError; so, when ``strict``, is a tensor of the
    checkpoint that nothing wants (except the derived rotary ``inv_freq`` of old checkpoints).
    The one reader of checkpoints: Llama.from_hf and the trainer's init_from_hf both use it.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    with open(os.path.join(path, "config.json")) as f:
        tied = bool(json.load(f).get("tie_word_embeddings", False))
    wanted = {to_hf_name(n): n for n in shapes}
    where = {}  # transformers' name -> its file
    for fname in _weight_files(path):
        with safe_open(os.path.join(path, fname), framework="pt") as f:
            for key in f.keys():
                # a tied checkpoint may still hold its head: the embedding is what gets read
                derived = key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight")
                if strict and key not in wanted and not derived:
                    raise ValueError(f"{path}/{fname}: unexpected tensor {key!r}")
                where[key] = fname
    sources: dict[str, list[str]] = {}  # the tensor to read -> the names it gives
    missing = []
    for key, name in wanted.items():
        if key not in where and key == "lm_head.weight" and tied:
            key = "model.embed_tokens.weight"
        if key in where:
            sources.setdefault(key, []).append(name)
        else:
            missing.append(key)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for fname in sorted({where[key] for key in sources}):
        with safe_open(os.path.join(path, fname), framework="pt") as f:
            for key in [k for k in sources if where[k] == fname]:
                t = f.get_tensor(key)
                for name in sources[key]:
                    if tuple(t.shape) != tuple(shapes[name]):
                        raise ValueError(f"{path}/{fname}: {key} has shape {tuple(t.shape)}, "
                                         f"expected {tuple(shapes[name])}")
                    yield name, t
                del t


def load_hf(cls, path, device=None, dtype=None) -> Llama:
    path = os.fspath(path)
    with open(os.path.join(path, "config.json")) as f:
        hf_cfg = json.load(f)
    cfg = config_from_hf(hf_cfg)
    if dtype is None:
        name = hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "float32"
        dtype = getattr(torch, name) if isinstance(name, str) else torch.float32
    # None: torch's default device, as a factory function would use (cpu unless set otherwise)
    device = torch.device(device) if device is not None else torch.get_default_device()
    with torch.device("meta"):
        model = cls(cfg)
    model.to_empty(device=device)
    model.to(dtype)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in iter_hf_tensors(path, {n: p.shape for n, p in params.items()}):
            params[name].copy_(t)
    model.init_rope()
    return model


def save_hf(model: Llama, path, max_shard_size: int = 5 * 2**30, dtype=None, bos_token_id: int | None = None,
            eos_token_id: int | None = None) -> None:
    """Shards of at most ``max_shard_size`` bytes, with model.safetensors.index.json when more
    than one. Files are written to a temporary directory and moved in once complete. With the
    tokenizer's special ids, also generation_config.json, so that transformers' generate stops at EOS."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    state = {to_hf_name(n): p.detach() for n, p in model.named_parameters()}
    dtype = dtype or next(iter(state.values())).dtype
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    os.makedirs(path, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".save_hf-", dir=path)
    try:
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map, total = {}, 0
        for fname, shard in zip(names, shards):
            # one shard's worth of converted tensors at a time
            tensors = {k: v.to(device="cpu", dtype=dtype).contiguous() for k, v in shard.items()}
            save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
            for k, v in tensors.items():
                weight_map[k] = fname
                total += v.numel() * v.element_size()
            del tensors
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_to_hf(model.cfg, dtype, bos_token_id, eos_token_id), f, indent=2)
        if bos_token_id is not None or eos_token_id is not None:
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump({"bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
                           "pad_token_id": eos_token_id}, f, indent=2)
        if len(shards) > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        new = set(os.listdir(tmp))
        for fname in sorted(new, key=lambda n: n == "config.json"):  # config last: it marks a complete save
            os.replace(os.path.join(tmp, fname), os.path.join(path, fname))
        # a previous save with another shard count must not leave stale shards behind
        for old in os.listdir(path):
            is_weights = old == "model.safetensors.index.json" or re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", old)
            if is_weights and old not in new:
                os.remove(os.path.join(path, old))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
