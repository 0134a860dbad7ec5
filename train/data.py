"""Token corpora, weighted blending and packed batches.

A corpus is a flat token stream with the offsets of its documents (each document is
``[BOS] text [EOS]``). Its training part is cut into windows of ``seq_len + 1`` tokens; the
last ``val_fraction`` of its documents are held out for validation.

The sample order is a pure function of (seed, global sample index): which corpus the i-th
sample comes from follows a low-discrepancy sequence over the blend weights (the realised
mixture tracks the weights to O(log n / n)), and each corpus's windows are visited in a seeded
permutation per epoch. A step's samples are the same whatever the data-parallel size, so the
data position is just the number of samples consumed, and resuming is exact, also under a
different DP size.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import zlib

import numpy as np

SHARD_FORMAT = "meditron-kernels-shard-v1"
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclasses.dataclass
class Corpus:
    name: str
    tokens: np.ndarray        # (n_tokens,) uint16 or uint32, possibly a read-only memmap
    doc_offsets: np.ndarray   # (n_docs + 1,) int64, doc_offsets[0] == 0, doc_offsets[-1] == n_tokens

    @classmethod
    def from_documents(cls, name: str, docs, tokenizer) -> "Corpus":
        ids, offsets = [], [0]
        for text in docs:
            t = [tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id]
            ids.extend(t)
            offsets.append(offsets[-1] + len(t))
        return cls(name, np.asarray(ids, dtype=token_dtype(tokenizer.vocab_size)), np.asarray(offsets, dtype=np.int64))

    def split(self, val_fraction: float) -> tuple[int, int]:
        """Token index where validation starts (a document boundary), and the end."""
        n_docs = len(self.doc_offsets) - 1
        n_val = int(round(n_docs * val_fraction))
        if val_fraction > 0:
            n_val = min(max(n_val, 1), n_docs - 1)
        return int(self.doc_offsets[n_docs - n_val]), int(self.doc_offsets[-1])


# ------------------------------------------------------------------------ shards on disk
def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of a vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def write_shard(path: str, corpus: Corpus, tokenizer_fingerprint: str) -> None:
    """tokens.bin + docs.npy + meta.json (written last: its presence marks a complete shard)."""
    os.makedirs(path, exist_ok=True)
    meta_path = os.path.join(path, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # never leave an old meta.json vouching for half-replaced files
    tok_path = os.path.join(path, "tokens.bin")
    with open(tok_path + ".tmp", "wb") as f:
        f.write(corpus.tokens.tobytes())
    os.replace(tok_path + ".tmp", tok_path)
    with open(os.path.join(path, "docs.npy.tmp"), "wb") as f:
        np.save(f, corpus.doc_offsets.astype(np.int64))
    os.replace(os.path.join(path, "docs.npy.tmp"), os.path.join(path, "docs.npy"))
    write_meta(path, corpus.name, corpus.tokens.dtype, len(corpus.tokens), len(corpus.doc_offsets) - 1,
               tokenizer_fingerprint, file_crc32(tok_path))


def write_meta(path: str, name: str, dtype, n_tokens: int, n_docs: int, tokenizer_fingerprint: str, crc32: int,
               **extra) -> None:
    """meta.json, atomically; the last file of a shard to appear."""
    meta = dict(format=SHARD_FORMAT, name=name, dtype=np.dtype(dtype).name, n_tokens=int(n_tokens),
                n_docs=int(n_docs), tokenizer=tokenizer_fingerprint, crc32=int(crc32), **extra)
    tmp = os.path.join(path, "meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, "meta.json"))


def file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return crc


class ShardError(ValueError):
    pass


_META_KEYS = {"format": str, "dtype": str, "n_tokens": int, "n_docs": int, "tokenizer": str, "crc32": int}


def load_shard(path: str, tokenizer_fingerprint: str | None = None, verify: str = "full") -> Corpus:
    """Memory-map a prepared shard, checking it against its index; errors name the file.

    verify: "full" also checks the crc32 of tokens.bin (reads it once); "size" checks only the
    sizes and the document index.
    """
    if verify not in ("full", "size"):
        raise ValueError(f"verify must be 'full' or 'size', got {verify!r}")
    meta_path = os.path.join(path, "meta.json")
    tok_path = os.path.join(path, "tokens.bin")
    docs_path = os.path.join(path, "docs.npy")
    if not os.path.isfile(meta_path):
        raise ShardError(f"{meta_path}: missing; {path!r} is not a complete shard (run python -m train.prepare)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ShardError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != SHARD_FORMAT:
        raise ShardError(f"{meta_path}: format {meta.get('format')!r}, expected {SHARD_FORMAT!r}")
    for key, typ in _META_KEYS.items():
        if not isinstance(meta.get(key), typ) or isinstance(meta.get(key), bool):
            raise ShardError(f"{meta_path}: {key!r} missing or not a {typ.__name__} ({meta.get(key)!r})")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise ShardError(f"{meta_path}: dtype {meta['dtype']!r}, expected 'uint16' or 'uint32'")
    if meta["n_tokens"] < 1 or meta["n_docs"] < 1:
        raise ShardError(f"{meta_path}: an empty shard ({meta['n_docs']} documents, {meta['n_tokens']} tokens)")
    if tokenizer_fingerprint is not None and meta["tokenizer"] != tokenizer_fingerprint:
        raise ShardError(f"{meta_path}: made with tokenizer {meta['tokenizer']!r}, but data.tokenizer is "
                         f"{tokenizer_fingerprint!r}")
    dtype = np.dtype(meta["dtype"])
    for p in (tok_path, docs_path):
        if not os.path.isfile(p):
            raise ShardError(f"{p}: missing")
    size = os.path.getsize(tok_path)
    if size != meta["n_tokens"] * dtype.itemsize:
        raise ShardError(f"{tok_path}: {size} bytes, but meta.json says {meta['n_tokens']} {dtype.name} tokens "
                         f"({meta['n_tokens'] * dtype.itemsize} bytes): truncated or corrupt")
    try:
        offsets = np.load(docs_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ShardError(f"{docs_path}: unreadable document index ({e})") from None
    if (not isinstance(offsets, np.ndarray) or offsets.dtype.kind not in "iu" or offsets.ndim != 1
            or len(offsets) != meta["n_docs"] + 1 or offsets[0] != 0 or offsets[-1] != meta["n_tokens"]
            or np.any(np.diff(offsets) <= 0)):
        raise ShardError(f"{docs_path}: the document index does not match {tok_path} "
                         f"(expected {meta['n_docs'] + 1} increasing integer offsets from 0 to {meta['n_tokens']})")
    if verify == "full" and file_crc32(tok_path) != meta["crc32"]:
        raise ShardError(f"{tok_path}: checksum mismatch with meta.json: the shard is corrupt")
    tokens = np.memmap(tok_path, dtype=dtype, mode="r", shape=(meta["n_tokens"],))
    name = meta.get("name") if isinstance(meta.get("name"), str) else os.path.basename(path.rstrip("/"))
    return Corpus(name, tokens, offsets.astype(np.int64, copy=False))


# ------------------------------------------------------------------------ blending
class Blend:
    """Deterministic weighted mixture of corpora, addressed by global sample index."""

    def __init__(self, corpora: list[Corpus], weights: list[float], seq_len: int, seed: int,
                 val_fraction: float, split: str = "train"):
        if not corpora:
            raise ValueError("no corpora to train on")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(corpora),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights must be {len(corpora)} finite non-negative numbers with a positive sum "
                             f"(one per corpus), got {list(weights)}")
        self.weights = w / w.sum()
        self.corpora = corpora
        self.seq_len = seq_len
        self.seed = seed
        self.split = split
        self.ranges = []
        for c in corpora:
            val_start, end = c.split(val_fraction)
            lo, hi = (0, val_start) if split == "train" else (val_start, end)
            n_windows = max((hi - lo - 1) // seq_len, 0)
            if n_windows < 1 and self.weights[len(self.ranges)] > 0:  # a zero-weight corpus is never read
                raise ValueError(f"corpus {c.name!r} has {hi - lo} {split} tokens, fewer than one sequence of "
                                 f"training.seq_len + 1 = {seq_len + 1}")
            self.ranges.append((lo, n_windows))
        # Corpus c owns [cum[c-1], cum[c]) of the unit interval; a zero weight gives an empty interval.
        # Rounding must not hand the top of the interval to a trailing zero-weight corpus.
        self._cum = np.cumsum(self.weights)
        self._cum[np.flatnonzero(self.weights > 0)[-1]:] = 1.0
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}
        self._offset = (seed * _GOLDEN + 0.5) % 1.0
        self._count_cache = (0, np.zeros(len(corpora), dtype=np.int64))

    def corpus_of(self, idx: np.ndarray) -> np.ndarray:
        """Corpus index of each global sample index (a Weyl sequence over the weights)."""
        u = (self._offset + idx.astype(np.float64) * _GOLDEN) % 1.0
        return np.searchsorted(self._cum, u, side="right").clip(max=len(self.corpora) - 1)

    def _counts_before(self, start: int) -> np.ndarray:
        """How many samples each corpus contributed among indices [0, start).

        Batches are read in order, so the count is advanced from the previous call's."""
        pos, counts = self._count_cache
        if start < pos:
            pos, counts = 0, np.zeros(len(self.corpora), dtype=np.int64)
        counts = counts.copy()
        block = 1 << 22
        for s in range(pos, start, block):
            ids = self.corpus_of(np.arange(s, min(start, s + block)))
            counts += np.bincount(ids, minlength=len(self.corpora))
        self._count_cache = (start, counts.copy())
        return counts

    def _window(self, c: int, k: int) -> int:
        """Start token of the k-th window drawn from corpus c (epochs reshuffle)."""
        lo, n = self.ranges[c]
        epoch, j = divmod(k, n)
        key = (c, epoch)
        perm = self._perm_cache.get(key)
        if perm is None:
            rng = np.random.default_rng([self.seed, c, epoch, 0 if self.split == "train" else 1])
            perm = rng.permutation(n)
            if len(self._perm_cache) > 2 * len(self.corpora):
                self._perm_cache.clear()
            self._perm_cache[key] = perm
        return lo + int(perm[j]) * self.seq_len

    def samples(self, start: int, count: int) -> list[tuple[int, int]]:
        """(corpus, window start token) of global samples start .. start + count - 1."""
        idx = np.arange(start, start + count)
        ids = self.corpus_of(idx)
        counts = self._counts_before(start)
        out = []
        for c in ids:
            out.append((int(c), self._window(int(c), int(counts[c]))))
            counts[c] += 1
        return out


def make_batch(blend: Blend, start: int, count: int, pack: bool, ignore_index: int = -100) -> dict:
    """Samples [start, start + count) as one micro batch (CPU tensors).

    tokens, targets (count, seq_len) int64; with pack: cu_seqlens (n_segments + 1,) int32 over the
    flattened batch, max_seqlen, and targets masked where the next token starts a new document.
    """
    import torch  # here, so that data preparation (worker processes) does not pay for importing torch

    L = blend.seq_len
    rows_in, rows_tgt, bounds = [], [], [0]
    max_len = 0
    for r, (c, s) in enumerate(blend.samples(start, count)):
        corpus = blend.corpora[c]
        w = np.asarray(corpus.tokens[s:s + L + 1], dtype=np.int64)
        inp, tgt = w[:-1], w[1:].copy()
        if pack:
            offs = corpus.doc_offsets
            lo, hi = np.searchsorted(offs, [s + 1, s + L], side="left")
            starts = offs[lo:hi] - s                   # documents starting inside the window
            tgt[starts - 1] = ignore_index             # no prediction across a document boundary
            if hi < len(offs) and offs[hi] == s + L:
                tgt[L - 1] = ignore_index
            cuts = np.concatenate([[0], starts, [L]])
            max_len = max(max_len, int(np.diff(cuts).max()))
            bounds.extend((r * L + cuts[1:]).tolist())
        rows_in.append(inp)
        rows_tgt.append(tgt)
    batch = dict(tokens=torch.from_numpy(np.stack(rows_in)), targets=torch.from_numpy(np.stack(rows_tgt)))
    if pack:
        batch["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32)
        batch["max_seqlen"] = max_len
    return batch


def bundled_corpora(tokenizer, seed: int = 0) -> tuple[list[Corpus], list[float]]:
    """The bundled synthetic GAP-Replay stand-in and its blend weights."""
    from . import corpus as bundled

    weights = {"guidelines": 0.4, "abstracts": 0.3, "papers": 0.2, "replay": 0.1}
    corpora = [Corpus.from_documents(name, bundled.documents(name, seed), tokenizer) for name in weights]
    return corpora, list(weights.values())
