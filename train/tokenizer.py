"""Tokenizers: a byte-level default, or a local sentencepiece .model / HF tokenizer.json file.

Nothing is downloaded. Every tokenizer gives ``encode(text) -> list[int]`` without special
tokens, ``encode_batch(texts)`` (the same, for many texts at once), ``decode(ids)``, plus
``bos_id``, ``eos_id``, ``vocab_size`` and a ``fingerprint`` (a digest of the tokenizer file)
that prepared shards record, so shards made with one tokenizer are never read with another.
"""
from __future__ import annotations

import hashlib
import os


class ByteTokenizer:
    """UTF-8 bytes 0..255, then BOS = 256 and EOS = 257."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257
    fingerprint = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


class SentencePieceTokenizer:
    def __init__(self, path: str):
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"data.tokenizer {path!r}: not a sentencepiece model ({e})") from None
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"data.tokenizer {path!r}: the sentencepiece model defines no BOS/EOS pieces")
        self.fingerprint = f"sentencepiece-{_file_digest(path)}"

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids) -> str:
        return self._sp.decode(list(ids))


class HFTokenizer:
    def __init__(self, path: str):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a bare Exception on a malformed file
            raise ValueError(f"data.tokenizer {path!r}: not an HF tokenizer.json ({e})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        def first(names):
            return next((i for i in map(self._tok.token_to_id, names) if i is not None), None)

        self.bos_id = first(("<s>", "<|begin_of_text|>", "[BOS]"))
        self.eos_id = first(("</s>", "<|end_of_text|>", "<|endoftext|>", "[EOS]"))
        if self.eos_id is None:
            raise ValueError(f"data.tokenizer {path!r}: no end-of-text token (</s>, <|endoftext|>, ...) "
                             f"in the vocabulary")
        if self.bos_id is None:
            self.bos_id = self.eos_id
        self.fingerprint = f"hf-{_file_digest(path)}"

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids))


def load_tokenizer(spec: str):
    """'byte', or a path to a sentencepiece ``.model`` or an HF ``tokenizer.json``.

    A directory (an HF model directory) means its tokenizer.model if it has one (Llama-2's
    own tokenizer), else its tokenizer.json.
    """
    if spec == "byte":
        return ByteTokenizer()
    if os.path.isdir(spec):
        for name in ("tokenizer.model", "tokenizer.json"):
            if os.path.isfile(os.path.join(spec, name)):
                return load_tokenizer(os.path.join(spec, name))
        raise ValueError(f"data.tokenizer {spec!r}: a directory without tokenizer.model or tokenizer.json")
    if not os.path.isfile(spec):
        raise ValueError(f"data.tokenizer must be 'byte' or an existing tokenizer file, got {spec!r}")
    if spec.endswith(".json"):
        return HFTokenizer(spec)
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    raise ValueError(f"data.tokenizer {spec!r}: expected a sentencepiece .model or an HF tokenizer.json file")
