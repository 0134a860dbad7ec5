"""A minimal Llama-2 on the meditron_kernels ops, with Hugging Face checkpoint I/O."""
from .llama import PRESETS, Attention, KVCache, Llama, LlamaConfig, TransformerBlock

__all__ = ["LlamaConfig", "Llama", "KVCache", "PRESETS", "Attention", "TransformerBlock"]
