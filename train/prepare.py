"""python -m train.prepare: tokenise jsonl or text files into one memory-mapped token shard.

    python -m train.prepare --input 'pubmed/*.jsonl' --out shards/pubmed --tokenizer llama2/tokenizer.model
    python -m train --model.preset=meditron-7b --data.tokenizer=llama2/tokenizer.model \
        --data.paths='["shards/pubmed", "shards/guidelines"]' --data.weights='[0.7, 0.3]'

Inputs, by extension (globs are expanded and sorted; the order of --input is kept):
  .jsonl  one JSON object per line, the document being the string under --text-key; blank lines
          are skipped, every other line is one document (an empty string too).
  .txt    --txt-docs file (default): each file is one document. --txt-docs paragraph: each block
          of non-blank lines is one document, blocks being separated by blank lines. Line endings
          become "\\n"; blank lines around a document are dropped; a file with no text adds nothing.

The shard is the format train/data.py reads: DIR/tokens.bin holds every document as
[BOS] text [EOS] in input order, exactly as Corpus.from_documents builds it; DIR/docs.npy the
n_docs + 1 offsets of the document starts; DIR/meta.json, written last, the tokenizer
fingerprint and the crc32 of tokens.bin.

Restartable: the inputs are cut at document boundaries into chunks of about --chunk-mb MB.
The cut depends only on the inputs and the chunk size, never on --workers, so the shard is
byte-identical for any number of workers. Worker processes tokenise chunks into DIR/parts/,
each written under a temporary name and renamed, so a part exists only when complete. After a
crash, a kill or Ctrl-C, rerunning the same command skips the finished parts. The final
tokens.bin is assembled by streaming the parts in order (memory holds one chunk at a time);
then meta.json is written and parts/ removed.
"""
from __future__ import annotations

import argparse
import codecs
import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
import zipfile
import zlib

import numpy as np
from tqdm import tqdm

from model.tokenizer import ByteTokenizer, load_tokenizer

from .data import ShardError, load_shard, token_dtype, write_meta

PLAN_VERSION = 1
# Texts are tokenised and turned into arrays a batch at a time, so that a worker never holds a
# whole chunk as Python int lists (8 to 36 bytes per token).
ENCODE_BATCH_BYTES = 1 << 20


class PrepareError(ValueError):
    """A bad input or output directory; the message names the file (and line)."""


@dataclasses.dataclass(frozen=True)
class Options:
    text_key: str = "text"
    txt_docs: str = "file"


# ------------------------------------------------------------------------ inputs and the plan
def expand_inputs(patterns: list[str]) -> list[str]:
    """Absolute paths of the input files, in the order given (each glob sorted), without repeats."""
    out, seen = [], set()
    for pattern in patterns:
        if glob.has_magic(pattern):
            paths = sorted(glob.glob(pattern, recursive=True))
            if not paths:
                raise PrepareError(f"--input {pattern!r}: no file matches")
        else:
            paths = [pattern]
        for p in paths:
            if not os.path.exists(p):
                raise PrepareError(f"{p}: no such file")
            if os.path.isdir(p):
                raise PrepareError(f"{p}: is a directory; give its files, e.g. {os.path.join(p, '*.jsonl')!r}")
            if _kind(p) is None:
                raise PrepareError(f"{p}: unknown input format; expected a .jsonl or a .txt file")
            ap = os.path.abspath(p)
            if ap not in seen:
                seen.add(ap)
                out.append(ap)
    if not out:
        raise PrepareError("no input files")
    return out


def _kind(path: str) -> str | None:
    return {".jsonl": "jsonl", ".txt": "txt"}.get(os.path.splitext(path)[1].lower())


def _line_start_at_or_after(f, x: int, size: int) -> int:
    if x <= 0:
        return 0
    if x >= size:
        return size
    f.seek(x - 1)
    if f.read(1) == b"\n":
        return x
    f.readline()
    return min(f.tell(), size)


def _blank_line_at_or_after(f, x: int, size: int) -> int:
    """Start of the first blank line at or after x (or the end of the file)."""
    p = _line_start_at_or_after(f, x, size)
    f.seek(p)
    while p < size:
        line = f.readline()
        if not line.strip():
            return p
        p += len(line)
    return size


def make_plan(paths: list[str], chunk_bytes: int, opts: Options) -> list[list[tuple[int, int, int]]]:
    """Chunks of about chunk_bytes: each a list of pieces (file index, start byte, end byte).

    Pieces end on document boundaries: a line start for jsonl, a blank line for paragraph
    text, the end of the file for whole-file text. Small files share a chunk."""
    chunks, cur, cur_bytes = [], [], 0
    for fi, path in enumerate(paths):
        size = os.path.getsize(path)
        splittable = _kind(path) == "jsonl" or opts.txt_docs == "paragraph"
        boundary = _line_start_at_or_after if _kind(path) == "jsonl" else _blank_line_at_or_after
        with open(path, "rb") as f:
            pos = 0
            while pos < size:
                end = boundary(f, pos + chunk_bytes - cur_bytes, size) if splittable else size
                if end <= pos:  # a boundary never precedes its target, which lies past pos
                    raise AssertionError(f"{path}: no progress at byte {pos}")
                cur.append((fi, pos, end))
                cur_bytes += end - pos
                pos = end
                if cur_bytes >= chunk_bytes:
                    chunks.append(cur)
                    cur, cur_bytes = [], 0
    if cur:
        chunks.append(cur)
    return chunks


def inputs_digest(paths: list[str], opts: Options, fingerprint: str) -> str:
    """Identifies what a shard is made from: input files (path, size, mtime), options, tokenizer.

    The chunk size is not part of it: the shard does not depend on it (the parts do)."""
    files = [(p, os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]
    blob = json.dumps(dict(version=PLAN_VERSION, files=files, tokenizer=fingerprint, **dataclasses.asdict(opts)),
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


# ------------------------------------------------------------------------ reading documents
def _line_number(path: str, offset: int) -> int:
    """1-based line number of byte offset (counted only when reporting an error)."""
    n, left = 1, offset
    with open(path, "rb") as f:
        while left > 0:
            block = f.read(min(left, 1 << 22))
            if not block:
                break
            n += block.count(b"\n")
            left -= len(block)
    return n


def _decode(path: str, data: bytes, start: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}:{_line_number(path, start + e.start)}: not valid UTF-8 ({e.reason})") from None


def _jsonl_docs(path: str, data: bytes, start: int, key: str):
    """Yield (text, byte offset of its line) for each non-blank line."""
    pos = 0
    for line in data.split(b"\n"):
        at = start + pos
        pos += len(line) + 1
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrepareError(f"{path}:{_line_number(path, at)}: invalid JSON: {e.msg} (column {e.colno})") from None
        except UnicodeDecodeError as e:
            raise PrepareError(f"{path}:{_line_number(path, at)}: not valid UTF-8 ({e.reason})") from None
        if not isinstance(obj, dict):
            raise PrepareError(f"{path}:{_line_number(path, at)}: expected a JSON object, got "
                               f"{type(obj).__name__}")
        if key not in obj:
            raise PrepareError(f"{path}:{_line_number(path, at)}: no {key!r} key (keys: {sorted(obj)[:10]}); "
                               f"choose the text field with --text-key")
        text = obj[key]
        if not isinstance(text, str):
            raise PrepareError(f"{path}:{_line_number(path, at)}: {key!r} holds a {type(text).__name__}, "
                               f"expected a string")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate such as "\ud800", which no tokenizer takes
                raise PrepareError(f"{path}:{_line_number(path, at)}: {key!r} is not valid Unicode "
                                   f"({e.reason})") from None
        yield text, at


def _blocks(data: bytes):
    """(first byte, lines) of each run of non-blank lines; lines without their line endings."""
    block, block_at, pos = [], 0, 0
    for line in data.split(b"\n"):
        if line.strip():
            if not block:
                block_at = pos
            block.append(line.rstrip(b"\r"))
        elif block:
            yield block_at, block
            block = []
        pos += len(line) + 1
    if block:
        yield block_at, block


def _txt_docs(path: str, data: bytes, start: int, mode: str):
    if start == 0 and data.startswith(codecs.BOM_UTF8):
        data, start = data[3:], 3
    if mode == "paragraph":
        for at, lines in _blocks(data):
            yield _decode(path, b"\n".join(lines), start + at), start + at
        return
    # The whole file: interior blank lines stay, the surrounding ones go.
    lines = [line.rstrip(b"\r") for line in data.split(b"\n")]
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        return
    last = max(i for i, line in enumerate(lines) if line.strip())
    yield _decode(path, b"\n".join(lines[first:last + 1]), start), start


def _documents(path: str, start: int, end: int, opts: Options):
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    if _kind(path) == "jsonl":
        return _jsonl_docs(path, data, start, opts.text_key)
    return _txt_docs(path, data, start, opts.txt_docs)


# ------------------------------------------------------------------------ tokenising a chunk
_WORKER: dict = {}  # what every chunk of a run shares, set once per process (not pickled per chunk)


def _init_worker(tokenizer, paths: list[str], opts: Options, parts_dir: str, quiet_threads: bool) -> None:
    if quiet_threads:  # one process per core already; the HF tokenizer's own thread pool would oversubscribe
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    _WORKER.update(tok=tok, paths=paths, opts=opts, parts_dir=parts_dir)


def _encode(tok, texts: list[str]) -> list[np.ndarray]:
    if isinstance(tok, ByteTokenizer):  # same ids as ByteTokenizer.encode, without Python int lists
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
    return [np.asarray(ids, dtype=np.int64) for ids in tok.encode_batch(texts)]


def tokenize_chunk(paths: list[str], pieces: list[tuple[int, int, int]], opts: Options,
                   tok) -> tuple[np.ndarray, np.ndarray]:
    """-> (tokens (n,) of the shard dtype, lengths (n_docs,) int64): each document as [BOS] text [EOS]."""
    dtype = token_dtype(tok.vocab_size)
    arrays, texts, pending = [], [], 0

    def flush():
        for ids in _encode(tok, texts):
            doc = np.empty(len(ids) + 2, dtype=dtype)
            doc[0], doc[1:-1], doc[-1] = tok.bos_id, ids, tok.eos_id
            arrays.append(doc)
        texts.clear()

    for fi, start, end in pieces:
        for text, _ in _documents(paths[fi], start, end, opts):
            texts.append(text)
            pending += len(text)
            if pending >= ENCODE_BATCH_BYTES:
                flush()
                pending = 0
    flush()
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    tokens = np.concatenate(arrays) if arrays else np.empty(0, dtype=dtype)
    return tokens, lengths


def _part_path(parts_dir: str, i: int) -> str:
    return os.path.join(parts_dir, f"{i:06d}.npz")


def _run_chunk(job) -> tuple[int, int, int, int]:
    """Tokenise chunk i into parts/NNNNNN.npz (atomically); -> (i, n_docs, n_tokens, input bytes)."""
    i, pieces = job
    w = _WORKER
    tokens, lengths = tokenize_chunk(w["paths"], pieces, w["opts"], w["tok"])
    final = _part_path(w["parts_dir"], i)
    tmp = f"{final}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, tokens=tokens, lengths=lengths)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return i, len(lengths), len(tokens), sum(e - s for _, s, e in pieces)


def _part_is_complete(path: str) -> bool:
    """Reads only the zip directory: a part torn by a crash (the rename makes that rare) is redone."""
    try:
        with np.load(path) as z:
            return set(z.files) == {"tokens", "lengths"}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False


# ------------------------------------------------------------------------ assembling the shard
def _read_part(path: str, key: str) -> np.ndarray:
    try:
        with np.load(path) as z:
            return z[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        os.remove(path)  # so that the rerun the message asks for makes it again
        raise PrepareError(f"{path}: corrupt part ({e}); it was removed, rerun to remake it") from None


def assemble(out: str, parts_dir: str, n_chunks: int, name: str, dtype: np.dtype, fingerprint: str,
             extra: dict, progress: bool) -> tuple[int, int]:
    """Stream the parts, in order, into tokens.bin and docs.npy; then meta.json. -> (n_docs, n_tokens)."""
    parts = [_part_path(parts_dir, i) for i in range(n_chunks)]
    n_docs = n_tokens = 0
    for p in parts:
        lengths = _read_part(p, "lengths")
        n_docs += len(lengths)
        n_tokens += int(lengths.sum())
    if n_docs == 0:
        raise PrepareError("the inputs hold no documents")
    tok_tmp, docs_tmp = os.path.join(out, "tokens.bin.tmp"), os.path.join(out, "docs.npy.tmp")
    docs = np.lib.format.open_memmap(docs_tmp, mode="w+", dtype=np.int64, shape=(n_docs + 1,))
    docs[0] = 0
    crc, tok_pos, doc_pos = 0, 0, 0
    with open(tok_tmp, "wb") as f, tqdm(total=n_tokens * dtype.itemsize, unit="B", unit_scale=True,
                                        desc="assembling", disable=not progress) as bar:
        for p in parts:
            lengths, tokens = _read_part(p, "lengths"), _read_part(p, "tokens")
            if tokens.dtype != dtype or len(tokens) != lengths.sum():
                os.remove(p)
                raise PrepareError(f"{p}: {len(tokens)} {tokens.dtype} tokens, but its documents sum to "
                                   f"{lengths.sum()} {dtype}; it was removed, rerun to remake it")
            f.write(memoryview(tokens))
            crc = zlib.crc32(memoryview(tokens), crc)
            docs[doc_pos + 1:doc_pos + 1 + len(lengths)] = tok_pos + np.cumsum(lengths)
            tok_pos += len(tokens)
            doc_pos += len(lengths)
            bar.update(tokens.nbytes)
        f.flush()
        os.fsync(f.fileno())
    docs.flush()
    del docs
    os.replace(tok_tmp, os.path.join(out, "tokens.bin"))
    os.replace(docs_tmp, os.path.join(out, "docs.npy"))
    write_meta(out, name, dtype, n_tokens, n_docs, fingerprint, crc, **extra)
    return n_docs, n_tokens


# ------------------------------------------------------------------------ the driver
class _Lock:
    """One writer per output directory (two runs would interleave their parts)."""

    def __init__(self, path: str):
        self.path = path
        self.f = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: run unlocked
            return self
        self.f = open(self.path, "w")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.close()
            raise PrepareError(f"{self.path}: another python -m train.prepare is writing this directory") from None
        return self

    def __exit__(self, *exc):
        if self.f is not None:
            try:
                os.remove(self.path)
            except OSError:
                pass
            self.f.close()


def prepare(inputs: list[str], out: str, tokenizer: str = "byte", workers: int = 1, text_key: str = "text",
            name: str | None = None, txt_docs: str = "file", chunk_bytes: int = 16 << 20, overwrite: bool = False,
            progress: bool = True, on_chunk=None) -> dict:
    """Tokenise inputs into the shard directory out; see the module docstring.

    on_chunk(i) is called in this process after chunk i is written (a test seam: raising
    there interrupts the run as a kill would). -> a summary: chunks, skipped, processed,
    n_docs, n_tokens, seconds."""
    t0 = time.perf_counter()
    _check_options(txt_docs, text_key, workers, chunk_bytes)
    opts = Options(text_key, txt_docs)
    paths = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    name = name or os.path.basename(os.path.abspath(out))
    digest = inputs_digest(paths, opts, tok.fingerprint)
    summary = dict(chunks=0, skipped=0, processed=0, n_docs=0, n_tokens=0)

    if os.path.exists(out) and not os.path.isdir(out):
        raise PrepareError(f"--out {out!r} exists and is not a directory")
    os.makedirs(out, exist_ok=True)
    parts_dir = os.path.join(out, "parts")
    with _Lock(os.path.join(out, ".prepare.lock")):
        meta = _up_to_date_shard(out, digest, name, tok, overwrite)
        if meta is not None:
            summary.update(n_docs=meta["n_docs"], n_tokens=meta["n_tokens"], seconds=time.perf_counter() - t0,
                           up_to_date=True)
            return summary
        chunks = make_plan(paths, chunk_bytes, opts)
        _resumable_parts_dir(parts_dir, f"{digest}-{chunk_bytes}", paths, len(chunks))
        nbytes = [sum(e - s for _, s, e in c) for c in chunks]
        done = [i for i in range(len(chunks)) if _part_is_complete(_part_path(parts_dir, i))]
        todo = sorted(set(range(len(chunks))) - set(done))
        summary.update(chunks=len(chunks), skipped=len(done))
        bar = tqdm(total=sum(nbytes), initial=sum(nbytes[i] for i in done), unit="B", unit_scale=True,
                   desc="tokenising", disable=not progress)
        try:
            _tokenise(todo, chunks, workers, tok, tokenizer, paths, opts, parts_dir, bar, on_chunk, summary)
        finally:
            bar.close()
        n_docs, n_tokens = assemble(out, parts_dir, len(chunks), name, token_dtype(tok.vocab_size), tok.fingerprint,
                                    dict(inputs=digest), progress)
        shutil.rmtree(parts_dir)
    load_shard(out, tok.fingerprint, verify="size")  # the shard must read back as the trainer reads it
    summary.update(n_docs=n_docs, n_tokens=n_tokens, seconds=time.perf_counter() - t0)
    return summary


def _check_options(txt_docs: str, text_key: str, workers: int, chunk_bytes: int) -> None:
    if txt_docs not in ("file", "paragraph"):
        raise PrepareError(f"--txt-docs must be 'file' or 'paragraph', got {txt_docs!r}")
    if not text_key:
        raise PrepareError("--text-key must not be empty")
    if workers < 1:
        raise PrepareError(f"--workers must be >= 1, got {workers}")
    if chunk_bytes < 1:
        raise PrepareError(f"the chunk size must be positive, got {chunk_bytes} bytes")


def _up_to_date_shard(out: str, digest: str, name: str, tok, overwrite: bool) -> dict | None:
    """The meta of a complete shard in out made from the same inputs (None: make it), after
    removing a shard that is to be replaced. Called under the directory's lock."""
    meta_path = os.path.join(out, "meta.json")
    if os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            meta = {}
        same = isinstance(meta, dict) and meta.get("inputs") == digest and meta.get("name") == name
        if same and not overwrite:
            try:
                load_shard(out, tok.fingerprint, verify="size")
                return meta
            except ShardError as e:
                print(f"{out}: remaking a damaged shard ({e})", file=sys.stderr)
        elif not overwrite:
            raise PrepareError(f"{meta_path}: {out!r} already holds a shard made from other inputs or options; "
                               f"pass --overwrite to replace it")
        os.remove(meta_path)  # first: a half-replaced shard must never look complete
    for f in ("tokens.bin", "docs.npy"):
        if os.path.exists(os.path.join(out, f)):
            os.remove(os.path.join(out, f))
    return None


def _resumable_parts_dir(parts_dir: str, parts_digest: str, paths: list[str], n_chunks: int) -> None:
    """Keep the parts an interrupted run of the same plan left (without half-written ones);
    start over when they came from other inputs or options."""
    plan_path = os.path.join(parts_dir, "plan.json")
    if os.path.isdir(parts_dir):
        try:
            with open(plan_path) as f:
                same = json.load(f).get("digest") == parts_digest
        except (OSError, ValueError, AttributeError):
            same = False
        if not same:
            print(f"{parts_dir}: parts from other inputs or options; starting over", file=sys.stderr)
            shutil.rmtree(parts_dir)
    os.makedirs(parts_dir, exist_ok=True)
    for f in os.listdir(parts_dir):  # leftovers of writes cut short
        if f.endswith(".tmp"):
            os.remove(os.path.join(parts_dir, f))
    if not os.path.isfile(plan_path):
        with open(plan_path + ".tmp", "w") as f:
            json.dump(dict(digest=parts_digest, inputs=paths, chunks=n_chunks), f, indent=1)
        os.replace(plan_path + ".tmp", plan_path)


def _tokenise(todo: list[int], chunks, workers: int, tok, tokenizer: str, paths, opts, parts_dir: str, bar,
              on_chunk, summary: dict) -> None:
    """Write the parts of chunks ``todo``, in this process or in a pool of ``workers``."""
    jobs = [(i, chunks[i]) for i in todo]
    if workers == 1 or len(jobs) <= 1:
        _init_worker(tok, paths, opts, parts_dir, quiet_threads=False)
        results = map(_run_chunk, jobs)
        pool = None
    else:
        # spawn, not fork: the parent may hold threads (torch, tokenizers) that fork would copy mid-state
        pool = multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)), initializer=_init_worker,
                                                         initargs=(tokenizer, paths, opts, parts_dir, True))
        results = pool.imap_unordered(_run_chunk, jobs)
    try:
        for i, n_docs, n_tokens, n_in in results:
            summary["processed"] += 1
            bar.update(n_in)
            if on_chunk is not None:
                on_chunk(i)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.prepare", description=__doc__.split("\n\n")[0],
                                epilog="See the top of train/prepare.py for the formats and restarts.")
    p.add_argument("--input", nargs="+", action="extend", required=True, metavar="FILE_OR_GLOB",
                   help=".jsonl or .txt files or globs (quote globs); may repeat")
    p.add_argument("--out", required=True, metavar="DIR", help="the shard directory to write")
    p.add_argument("--tokenizer", default="byte", help="byte, or a sentencepiece .model or HF tokenizer.json path")
    p.add_argument("--workers", type=int, default=_usable_cpus(), help="tokenising processes (default: usable cores)")
    p.add_argument("--text-key", default="text", help="the JSON field that holds a document's text (jsonl)")
    p.add_argument("--name", default=None, help="corpus name recorded in meta.json (default: the DIR's name)")
    p.add_argument("--txt-docs", choices=("file", "paragraph"), default="file",
                   help=".txt files: one document per file, or per blank-line-separated paragraph block")
    p.add_argument("--chunk-mb", type=float, default=16.0, help="input megabytes per restartable unit of work")
    p.add_argument("--overwrite", action="store_true", help="replace a complete shard already in DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        s = prepare(args.input, args.out, args.tokenizer, args.workers, args.text_key, args.name, args.txt_docs,
                    max(1, int(args.chunk_mb * (1 << 20))), args.overwrite, progress=not args.no_progress)
    except (PrepareError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; rerun the same command to continue from the finished parts in "
              f"{os.path.join(args.out, 'parts')}", file=sys.stderr)
        return 130
    if s.get("up_to_date"):
        print(f"{args.out}: up to date ({s['n_docs']} documents, {s['n_tokens']} tokens)")
    else:
        print(f"{args.out}: {s['n_docs']} documents, {s['n_tokens']} tokens; {s['processed']} of {s['chunks']} "
              f"chunks tokenised ({s['skipped']} already done) in {s['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
