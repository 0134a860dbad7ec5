"""The fused kernels inside Hugging Face transformers models.

    import meditron_kernels.transformers as mkt
    model = AutoModelForCausalLM.from_pretrained(path)
    mkt.apply(model)          # this instance only; returns it

Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (q/k/v bias) and Qwen3ForCausalLM
(per-head q/k norms), and subclasses of them. What ``apply`` changes, module by module, on the one
model it is given (other models in the process, and the classes themselves, are untouched):

- every RMSNorm (the decoder's two, the final one, Qwen3's q_norm/k_norm): ``mk.rms_norm``;
- each decoder layer: the residual add before the post-attention norm is fused into it
  (``mk.rms_norm(x, w, residual=r)``). The layer's class is swapped for a per-instance subclass of
  the same name, as FSDP2's ``fully_shard`` does, so that gradient checkpointing (which transformers
  wraps around the class's forward) keeps working;
- each attention: q/k/v projections stay the model's ``nn.Linear`` modules (PEFT/LoRA adapters on
  them still apply), rotary is ``mk.apply_rotary`` on the per-token cos/sin transformers computes,
  attention is ``mk.flash_attention`` (causal, GQA without copies);
- each MLP: ``down_proj(mk.swiglu(gate_proj(x), up_proj(x)))``;
- padding and packing: a 2-D ``attention_mask`` runs as packed documents (the real tokens gathered,
  attended per sequence, scattered back; padded positions of the attention output are zero), and
  ``position_ids`` that restart (transformers' ``DataCollatorWithFlattening``) run as packed
  documents with no attention across them, exactly as transformers' own masks define them;
- the causal-LM loss: in training (``model.training``) with ``labels``, the loss is
  ``mk.fused_linear_cross_entropy`` of the final hidden states and ``lm_head.weight`` against the
  shifted labels (or ``shift_labels``), ``ignore_index=-100``, divided by ``num_items_in_batch``
  when the Trainer passes it; the logits are never materialised and ``outputs.logits`` is None.
  In eval mode, or without labels, the forward is transformers' own and returns the logits.

Importing this module also registers the attention implementation ``"meditron"`` with
transformers' ``AttentionInterface`` (and its mask interface), so ``from_pretrained(...,
attn_implementation="meditron")`` uses ``mk.flash_attention`` without ``apply``.

Generation with a KV cache: when the keys outnumber the queries (decoding after a prefill), the
attention falls back to the model's configured implementation (or, under "meditron", to PyTorch's
SDPA with the bottom-right causal and padding mask): correct, not fused.

Not supported (clear errors): attention dropout > 0, activations other than SiLU for swiglu,
sliding-window attention over sequences longer than the window, 4-D custom attention masks.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("meditron_kernels.transformers needs the transformers package (pip install transformers)") from e

import meditron_kernels as mk

from .backend import _check_name
from .packing import cu_seqlens_from_positions

__all__ = ["apply", "SUPPORTED", "meditron_attention"]

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------- packing plan
@dataclasses.dataclass(frozen=True)
class _Packing:
    """How a (batch, seq) batch runs through packed attention, computed once per forward.

    cu_seqlens None: a plain causal batch. index None: the batch's batch * seq tokens are the pack,
    split into documents at cu_seqlens. index given: only those tokens (the unpadded ones) are.
    """
    cu_seqlens: torch.Tensor | None = None  # (n_docs + 1,) int32
    index: torch.Tensor | None = None       # (n_real,) int64 into the flattened batch
    max_seqlen: int | None = None


@torch.library.custom_op("meditron_kernels::hf_token_index", mutates_args=())
def _token_index(mask: torch.Tensor) -> torch.Tensor:
    """mask (batch, seq) bool -> (n_true,) int64: the flat indices of the kept tokens."""
    return mask.reshape(-1).nonzero().reshape(-1)


@_token_index.register_fake
def _(mask):
    # A data-dependent length: an unbacked size under torch.compile, so the graph does not break.
    # (No max bound: under dynamic shapes numel() is symbolic, and the bound must be a plain int.)
    n = torch.library.get_ctx().new_dynamic_size()
    return mask.new_empty((n,), dtype=torch.int64)


@torch.library.custom_op("meditron_kernels::hf_document_offsets", mutates_args=())
def _document_offsets(position_ids: torch.Tensor) -> torch.Tensor:
    """position_ids (batch, seq) -> cu_seqlens (n_docs + 1,) int32 over the flattened batch, by
    transformers' own rule (find_packed_sequence_indices), so the documents are the ones the
    unpatched model's masks keep apart. A custom op: its output size depends on the data."""
    return cu_seqlens_from_positions(position_ids)


@_document_offsets.register_fake
def _(position_ids):
    n = torch.library.get_ctx().new_dynamic_size(min=2)  # n_docs + 1
    return position_ids.new_empty((n,), dtype=torch.int32)


def _plan(attention_mask, position_ids, kwargs: dict, batch: int, seq: int) -> _Packing:
    """The packing of a batch from what transformers hands a model: a 2-D padding mask first (as
    transformers, which looks for packed positions only without one), then flash-attention offsets
    (DataCollatorWithFlattening(return_flash_attn_kwargs=True)), then position_ids."""
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError("meditron attention takes a 2-D (batch, seq) padding attention_mask; got "
                             f"{attention_mask.dim()}-D shape {tuple(attention_mask.shape)} (custom 4-D masks "
                             "are not supported)")
        mask = attention_mask[:, -seq:].bool()
        cu = F.pad(mask.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
        return _Packing(cu, _token_index(mask), seq)
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        cu_k = kwargs.get("cu_seq_lens_k")
        if cu_k is not None and cu_k is not cu and cu_k.shape != cu.shape:
            raise ValueError("cu_seq_lens_k must equal cu_seq_lens_q for self-attention")
        max_len = kwargs.get("max_length_q")
        return _Packing(cu.to(torch.int32), None, int(max_len) if max_len is not None else seq)
    if position_ids is not None:
        return _Packing(_document_offsets(position_ids.expand(batch, seq)), None, seq)
    return _Packing()


# ---------------------------------------------------------------------------- attention
def _sliding_window(module) -> int | None:
    # Qwen2/Qwen3 set it per layer; Mistral reads its config.
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    return getattr(getattr(module, "config", None), "sliding_window", None)


def _sdpa_with_cache(q, k, v, attention_mask, scale):
    """Decoding: q (b, sq, h, d) against more keys k, v (b, sk, hkv, d): the causal mask aligned
    bottom-right and the 2-D padding mask over the keys, through PyTorch's SDPA."""
    sq, sk = q.shape[1], k.shape[1]
    mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -sk:].bool()
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       scale=scale, enable_gqa=True)
    return o.transpose(1, 2)


def _attend(module, q, k, v, attention_mask, scale, kwargs: dict, backend=None, packing: _Packing | None = None):
    """Causal self-attention in the flash-attention layout: q (b, s, h, d); k, v (b, sk, hkv, d)."""
    b, s, h, d = q.shape
    if k.shape[1] != s:
        return _sdpa_with_cache(q, k, v, attention_mask, scale)
    window = _sliding_window(module)
    if window is not None and s > window:
        raise ValueError(f"{type(module).__name__}: sliding-window attention (sliding_window={window}) over "
                         f"{s} tokens is not supported by the meditron kernels; use sequences of at most "
                         f"{window} tokens or the model's own attention")
    if packing is None:
        packing = _plan(attention_mask, kwargs.get("position_ids"), kwargs, b, s)
    if packing.cu_seqlens is None:
        return mk.flash_attention(q, k, v, causal=True, softmax_scale=scale, backend=backend)
    flat = [t.reshape(b * s, t.shape[2], d) for t in (q, k, v)]
    if packing.index is None:
        o = mk.flash_attention(*flat, causal=True, softmax_scale=scale, cu_seqlens=packing.cu_seqlens,
                               max_seqlen=packing.max_seqlen, backend=backend)
        return o.view(b, s, h, d)
    idx = packing.index
    o = mk.flash_attention(*(t.index_select(0, idx) for t in flat), causal=True, softmax_scale=scale,
                           cu_seqlens=packing.cu_seqlens, max_seqlen=packing.max_seqlen, backend=backend)
    return q.new_zeros(b * s, h, d).index_copy(0, idx, o).view(b, s, h, d)


def meditron_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' AttentionInterface signature: query (b, h, s, d), key/value (b, hkv, sk, d),
    attention_mask the 2-D padding mask (or None) -> (output (b, s, h, d), None)."""
    if dropout:
        raise ValueError(f"attn_implementation='meditron' has no attention dropout, got dropout={dropout}; "
                         "set config.attention_dropout = 0.0")
    kwargs.pop("sliding_window", None)  # read from the module itself
    packing = kwargs.pop("meditron_packing", None)
    o = _attend(module, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask,
                scaling, kwargs, packing=packing)
    return o, None


def _meditron_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                   attention_mask=None, **kwargs):
    # The attention needs only the 2-D padding mask (causality and packing it builds itself).
    return None if attention_mask is None else attention_mask[:, -kv_length:]


AttentionInterface.register("meditron", meditron_attention)
AttentionMaskInterface.register("meditron", _meditron_mask)


def _cache_of(kwargs: dict):
    # transformers renamed past_key_values to cache (5.2x); accept either.
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, *, _opts, _scale,
                       **kwargs):
    """The decoder's attention with the projections as the model's own modules."""
    b, s, _ = hidden_states.shape
    shape = (b, s, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(shape)  # (b, s, h, d)
    k = self.k_proj(hidden_states).view(shape)
    v = self.v_proj(hidden_states).view(shape)
    if getattr(self, "q_norm", None) is not None:  # Qwen3: RMSNorm over head_dim, per head
        q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = position_embeddings
    if _opts.rotary:
        q, k = mk.apply_rotary(q, k, cos, sin, backend=_opts.backend)
    else:
        q, k = _opts.modeling.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    packing = kwargs.pop("meditron_packing", None)
    cache = _cache_of(kwargs)
    dropout = self.attention_dropout if self.training else 0.0
    if cache is not None:
        k_all, v_all = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx, kwargs=kwargs)
        if k_all.shape[2] != s:  # decoding: the model's own attention over the cache
            interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                              _opts.modeling.eager_attention_forward)
            o, _ = interface(self, q.transpose(1, 2), k_all, v_all, attention_mask, dropout=dropout,
                             scaling=self.scaling, sliding_window=_sliding_window(self), **kwargs)
            return self.o_proj(o.reshape(b, s, -1)), None
    if _opts.attention:
        o = _attend(self, q, k, v, attention_mask, _scale, kwargs, _opts.backend, packing)
    else:
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                          _opts.modeling.eager_attention_forward)
        o, _ = interface(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
                         dropout=dropout, scaling=self.scaling, sliding_window=_sliding_window(self), **kwargs)
    return self.o_proj(o.reshape(b, s, -1)), None


# ---------------------------------------------------------------------------- norms, MLP, layer
def _rms_norm_forward(self, hidden_states, *, _opts):
    return mk.rms_norm(hidden_states, self.weight, self.variance_epsilon, backend=_opts.backend)


def _swiglu_forward(self, x, *, _opts):
    return self.down_proj(mk.swiglu(self.gate_proj(x), self.up_proj(x), backend=_opts.backend))


def _decoder_forward(self, hidden_states, **kwargs):
    """Pre-norm decoder layer with the post-attention residual add fused into its norm."""
    residual = hidden_states
    h = self.input_layernorm(hidden_states)
    h = self.self_attn(hidden_states=h, **kwargs)[0]
    norm = self.post_attention_layernorm
    if h.dtype == residual.dtype:
        h, residual = mk.rms_norm(h, norm.weight, norm.variance_epsilon, residual=residual,
                                  backend=self._meditron_opts.backend)
    else:  # autocast: the projections' output dtype differs from the residual stream's
        residual = residual + h
        h = norm(residual)
    return residual + self.mlp(h)


_LAYER_CLASSES: dict[type, type] = {}


def _swap_decoder_class(layer: nn.Module) -> None:
    # A subclass of the layer's own class, with its name, created once per class and given to this
    # instance only. transformers wraps gradient checkpointing around a layer class's forward (or
    # its __call__, in older releases); a subclass inherits whichever it is.
    cls = type(layer)
    sub = _LAYER_CLASSES.get(cls)
    if sub is None:
        sub = type(cls.__name__, (cls,), {"forward": _decoder_forward, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__, "_meditron_base_class": cls,
                                          "__reduce_ex__": _reduce_swapped_layer})
        _LAYER_CLASSES[cls] = sub
    layer.__class__ = sub


def _reduce_swapped_layer(self, protocol):
    # pickle names a class by module and qualified name, and by those this subclass is
    # transformers' own class: rebuild from that class, swap again, then restore the state.
    return _rebuild_swapped_layer, (self._meditron_base_class,), self.__dict__


def _rebuild_swapped_layer(cls: type) -> nn.Module:
    layer = cls.__new__(cls)
    _swap_decoder_class(layer)
    return layer


# ---------------------------------------------------------------------------- model forwards
def _base_model_forward(self, input_ids=None, attention_mask=None, position_ids=None, *, _opts, **kwargs):
    """Computes the packing once per forward for every layer, then runs transformers' forward. The
    2-D mask is consumed here, so transformers builds no 4-D mask for the meditron attention."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and cache.get_seq_length() > 0:  # decoding: transformers' masks for its attention
        return type(self).forward(self, input_ids, attention_mask, position_ids, **kwargs)
    ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    batch, seq = ref.shape[:2]
    packing = _plan(attention_mask, position_ids, kwargs, batch, seq)
    return type(self).forward(self, input_ids, None, position_ids, meditron_packing=packing, **kwargs)


def _causal_lm_forward(self, *args, _opts, _positional, **kwargs):
    """transformers' forward, except in training with labels: then the fused loss, no logits."""
    if len(args) > len(_positional):
        raise TypeError(f"{type(self).__name__}.forward takes at most {len(_positional)} positional arguments")
    kwargs.update(zip(_positional, args))
    labels = kwargs.get("labels")
    lm_head = self.get_output_embeddings()
    fusable = type(lm_head) is nn.Linear and lm_head.bias is None
    if labels is None or not self.training or not fusable:
        return type(self).forward(self, **kwargs)
    kwargs.pop("labels")
    shift_labels = kwargs.pop("shift_labels", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    return_dict = kwargs.pop("return_dict", None)
    kwargs.pop("logits_to_keep", None)
    outputs = getattr(self, self.base_model_prefix)(**kwargs)
    hidden = outputs.last_hidden_state  # (batch, seq, dim)
    if shift_labels is None:  # token t predicts label t + 1; the last position predicts nothing
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    loss = mk.fused_linear_cross_entropy(hidden, lm_head.weight, shift_labels, IGNORE_INDEX,
                                         backend=_opts.backend)
    if num_items is not None:
        # transformers: sum over the micro-batch / num_items_in_batch (all tokens of the step).
        n_valid = (shift_labels != IGNORE_INDEX).sum()
        if torch.is_tensor(num_items):
            num_items = num_items.to(loss.device)
        loss = torch.where(n_valid > 0, loss, torch.zeros_like(loss)) * n_valid / num_items
    out = transformers.modeling_outputs.CausalLMOutputWithPast(
        loss=loss, logits=None, hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    if return_dict is False or (return_dict is None and not getattr(self.config, "return_dict", True)):
        return out.to_tuple()
    return out


# ---------------------------------------------------------------------------- apply
@dataclasses.dataclass(frozen=True)
class _Options:
    rms_norm: bool
    rotary: bool
    attention: bool
    swiglu: bool
    fused_linear_cross_entropy: bool
    backend: str | None
    modeling: types.ModuleType

    def __deepcopy__(self, memo):  # immutable, and holds a module: a copied model shares it
        return self

    def __reduce__(self):  # a module cannot be pickled, its name can
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return _options_from, (dict(fields, modeling=self.modeling.__name__),)


def _options_from(fields: dict) -> _Options:
    return _Options(**dict(fields, modeling=importlib.import_module(fields["modeling"])))


def _supported_classes() -> tuple[type, ...]:
    return tuple(getattr(transformers, name) for name in SUPPORTED)


class _Forward:
    """A patched module's forward: ``fn(module, *args, **extra, **kwargs)``.

    Set as an instance attribute, it shadows the class's forward for this module only (``fn``
    calls the class's forward itself when it needs it). A plain object of module-level parts
    rather than a closure, so that pickle and copy.deepcopy copy it along with its module: the
    copy is patched too."""

    def __init__(self, module: nn.Module, fn, extra: dict):
        self.module, self.fn, self.extra = module, fn, extra

    def __call__(self, *args, **kwargs):
        return self.fn(self.module, *args, **self.extra, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        # Trainer and generate read the accepted arguments from the signature: transformers' own.
        return inspect.signature(type(self.module).forward.__get__(self.module))


def _bind(module: nn.Module, fn, **extra) -> None:
    module.forward = _Forward(module, fn, extra)


def apply(model, rms_norm: bool = True, rotary: bool = True, attention: bool = True, swiglu: bool = True,
          fused_linear_cross_entropy: bool = True, *, backend: str | None = None):
    """Patch one Llama/Mistral/Qwen2/Qwen3 causal LM in place with the fused kernels; returns it.

    Only this instance changes (its modules' forwards; its decoder layers' classes become
    same-named per-instance subclasses). backend: as every op's ``backend=`` (None: auto per
    device, or mk.set_backend / MEDITRON_KERNELS_BACKEND). A PEFT model is patched through its
    base model. Call it before wrapping the model in TRL's SFTTrainer, whose own fused LM head then
    computes the loss over our backbone.
    """
    flags = dict(rms_norm=rms_norm, rotary=rotary, attention=attention, swiglu=swiglu,
                 fused_linear_cross_entropy=fused_linear_cross_entropy)
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    if backend is not None:
        _check_name(backend, "backend")
    target = model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model
    if not isinstance(target, _supported_classes()):
        raise TypeError(f"meditron_kernels.transformers.apply supports {', '.join(SUPPORTED)} (and their "
                        f"subclasses), got {type(target).__name__}")
    if getattr(target, "_meditron_kernels", None) is not None:
        raise ValueError(f"this {type(target).__name__} was already patched by meditron_kernels.transformers.apply "
                         f"({target._meditron_kernels})")
    config = target.config
    if swiglu and getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"swiglu=True needs hidden_act 'silu', but {type(target).__name__} uses "
                         f"{config.hidden_act!r}; pass swiglu=False")
    if attention and getattr(config, "attention_dropout", 0.0):
        raise ValueError(f"attention=True has no attention dropout, but {type(target).__name__} has "
                         f"attention_dropout={config.attention_dropout}; set it to 0.0 or pass attention=False")
    opts = _Options(**flags, backend=backend, modeling=_modeling_module(target))
    base = getattr(target, target.base_model_prefix)
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if rotary or attention:
            # The softmax scale as a constant fixed now (None: the kernels' 1 / sqrt(head_dim)):
            # torch.compile(dynamic=True) would otherwise trace the module's float as a symbol.
            scale = None if attn.scaling == attn.head_dim ** -0.5 else float(attn.scaling)
            _bind(attn, _attention_forward, _opts=opts, _scale=scale)
        if swiglu:
            _bind(mlp, _swiglu_forward, _opts=opts)
        if rms_norm:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm,
                         getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)):
                if norm is not None:
                    _bind(norm, _rms_norm_forward, _opts=opts)
            layer._meditron_opts = opts
            _swap_decoder_class(layer)
    if rms_norm:
        _bind(base.norm, _rms_norm_forward, _opts=opts)
    if attention:
        _bind(base, _base_model_forward, _opts=opts)
    if fused_linear_cross_entropy:
        positional = [p.name for p in inspect.signature(target.forward).parameters.values()
                      if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        _bind(target, _causal_lm_forward, _opts=opts, _positional=positional)
    target._meditron_kernels = {k: v for k, v in flags.items()} | {"backend": backend}
    return model


def _modeling_module(model) -> types.ModuleType:
    # transformers' modeling file of the architecture (for a user's subclass: of its base class).
    for cls in type(model).__mro__:
        mod = sys.modules.get(cls.__module__)
        if mod is not None and hasattr(mod, "apply_rotary_pos_emb") and hasattr(mod, "eager_attention_forward"):
            return mod
    raise TypeError(f"could not find the transformers modeling module of {type(model).__name__}")
