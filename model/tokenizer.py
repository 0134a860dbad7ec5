"""Tokenizers: a byte-level default, or a local sentencepiece .model / HF tokenizer.json file.

Nothing is downloaded. Every tokenizer gives ``encode(text) -> list[int]`` without special
tokens, ``encode_batch(texts)`` (the same, for many texts at once), ``decode(ids)``, plus
``bos_id``, ``eos_id``, ``vocab_size`` and a ``fingerprint`` (a digest of the tokenizer file)
that prepared shards record, so shards made with one tokenizer are never read with another.

``save_tokenizer`` writes one into a Hugging Face model directory (the byte tokenizer as an
equivalent tokenizer.json), and ``load_tokenizer`` of that directory gives it back. Written so that
transformers' ``AutoTokenizer(text)`` gives what training saw: BOS, then ``encode(text)``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil


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
        self.path = path
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"data.tokenizer {path!r}: the sentencepiece model defines no BOS/EOS pieces")
        self.fingerprint = f"sentencepiece-{_file_digest(path)}"

    @property
    def adds_dummy_prefix(self) -> bool:
        """Whether the model's normaliser puts "▁" before a text (sentencepiece's add_dummy_prefix)."""
        return self._sp.encode("a", out_type=str)[0].startswith("\u2581")

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
        self.path = path
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

    A directory (an HF model directory) means the byte tokenizer if save_tokenizer wrote it there,
    else its tokenizer.model if it has one (Llama-2's own tokenizer), else its tokenizer.json.
    """
    if spec == "byte":
        return ByteTokenizer()
    if os.path.isdir(spec):
        config = os.path.join(spec, "tokenizer_config.json")
        if os.path.isfile(config):
            with open(config) as f:
                if json.load(f).get(_BYTE_MARK) == ByteTokenizer.fingerprint:
                    return ByteTokenizer()
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


_BYTE_MARK = "meditron_byte_tokenizer"


def _byte_chars() -> list[str]:
    # The byte-level alphabet of Hugging Face's ByteLevel pre-tokenizer: printable Latin-1 bytes stand
    # for themselves, the other bytes for the code points from 256 up, in byte order.
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_tokenizer_json():
    """The byte tokenizer as a ``tokenizers.Tokenizer``: ids 0..255 are the UTF-8 bytes, <s> = 256,
    </s> = 257 (a byte-level BPE without merges), so transformers reads it as it was trained."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(_byte_chars())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # One difference remains: tokenizers matches special tokens inside the text, so a literal "<s>" in
    # a text becomes id 256 rather than three bytes (load_tokenizer of the directory is exact).
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tok.post_processor = _bos_first("<s>", ByteTokenizer.bos_id)
    return tok


def _bos_first(bos: str, bos_id: int):
    # transformers' fast tokenizers add special tokens only through the tokenizer.json's post-processor
    # (tokenizer_config's add_bos_token alone does nothing there): BOS before each sequence, as trained.
    from tokenizers import processors

    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])


def save_tokenizer(tok, directory: str) -> list[str]:
    """Write ``tok`` into ``directory`` (a Hugging Face model directory) -> the files written.

    sentencepiece: tokenizer.model; HF: tokenizer.json; byte: an equivalent tokenizer.json. Each with
    tokenizer_config.json naming the special tokens, so transformers' AutoTokenizer loads it too.
    """
    os.makedirs(directory, exist_ok=True)
    if isinstance(tok, SentencePieceTokenizer):
        name, cls = "tokenizer.model", "LlamaTokenizer"
        shutil.copyfile(tok.path, os.path.join(directory, name))
    elif isinstance(tok, HFTokenizer):
        name, cls = "tokenizer.json", "PreTrainedTokenizerFast"
        probe = "a b"
        if tok._tok.encode(probe, add_special_tokens=True).ids == [tok.bos_id] + tok.encode(probe):
            shutil.copyfile(tok.path, os.path.join(directory, name))  # its own post-processor adds BOS already
        else:  # the same vocabulary and rules, with BOS added (training encodes without special tokens)
            from tokenizers import Tokenizer

            hf = Tokenizer.from_str(tok._tok.to_str())
            hf.post_processor = _bos_first(_piece(tok, tok.bos_id), tok.bos_id)
            hf.save(os.path.join(directory, name))
    elif isinstance(tok, ByteTokenizer):
        name, cls = "tokenizer.json", "PreTrainedTokenizerFast"
        byte_tokenizer_json().save(os.path.join(directory, name))
    else:
        raise TypeError(f"cannot save a tokenizer of type {type(tok).__name__}")
    special = {"bos_token": _piece(tok, tok.bos_id), "eos_token": _piece(tok, tok.eos_id)}
    config = {"tokenizer_class": cls, **special, "add_bos_token": True, "add_eos_token": False,
              "clean_up_tokenization_spaces": False}
    if isinstance(tok, SentencePieceTokenizer):
        # transformers' Llama tokenizer puts a space before the text unless told otherwise; the model's
        # own normaliser decides (Llama-2's adds one, a model trained with add_dummy_prefix=False does not)
        config["add_prefix_space"] = tok.adds_dummy_prefix
    if isinstance(tok, ByteTokenizer):
        config[_BYTE_MARK] = ByteTokenizer.fingerprint  # load_tokenizer gives back ByteTokenizer itself
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return [name, "tokenizer_config.json"]


def _piece(tok, i: int) -> str:
    if isinstance(tok, SentencePieceTokenizer):
        return tok._sp.id_to_piece(i)
    if isinstance(tok, HFTokenizer):
        return tok._tok.id_to_token(i)
    return {256: "<s>", 257: "</s>"}[i]
