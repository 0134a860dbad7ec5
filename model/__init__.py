"""The Llama-family decoder (Llama-2/3, Mistral, Qwen2, Qwen3) on the meditron_kernels ops, with Hugging Face checkpoint I/O."""
from .llama import PRESETS, Attention, KVCache, Llama, LlamaConfig, TransformerBlock

__all__ = ["LlamaConfig", "Llama", "KVCache", "PRESETS", "Attention", "TransformerBlock"]
