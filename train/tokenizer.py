"""The tokenizers live in ``model.tokenizer`` (the model package loads runs with them); this name
stays for the trainer's imports."""
from model.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, load_tokenizer, save_tokenizer

__all__ = ["ByteTokenizer", "HFTokenizer", "SentencePieceTokenizer", "load_tokenizer", "save_tokenizer"]
