"""python -m train.prepare and the tokenizers: shards equal Corpus.from_documents, any worker
count gives the same bytes, restarts redo only unfinished chunks, bad inputs are named.

The sentencepiece model and the HF tokenizer.json are trained here, offline, on the bundled text."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from train import corpus as bundled
from train.data import Corpus, ShardError, load_shard, write_shard
from train.prepare import PrepareError, main, prepare
from model.tokenizer import ByteTokenizer, load_tokenizer

from tests.helpers import build_tokenizer_files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRICKY = ["", "x", "two\nlines\n\nand a blank one", "Unicode: é ü 😀 中文 \u2028 done", "tab\tand  spaces ",
          '{"looks": "like json"}', "a" * 5000]


def documents() -> list[list[str]]:
    """Three small collections; the first holds edge cases (empty, unicode, newlines, a long one)."""
    return [TRICKY + bundled.documents("guidelines", 0, 60), bundled.documents("abstracts", 0, 40),
            bundled.documents("replay", 0, 30)]


def write_jsonl(path, docs, key="text", extra=None):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            obj = {"id": i, key: d, **(extra or {})}
            f.write(json.dumps(obj, ensure_ascii=i % 2 == 0) + "\n")
            if i == 3:
                f.write("\n")  # blank lines are skipped
    return str(path)


@pytest.fixture
def jsonl_inputs(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    groups = documents()
    paths = [write_jsonl(d / f"{i}_part.jsonl", g) for i, g in enumerate(groups)]
    return paths, [doc for g in groups for doc in g]


def shard_bytes(path) -> dict:
    return {f: open(os.path.join(path, f), "rb").read() for f in ("tokens.bin", "docs.npy", "meta.json")}


def assert_equals_from_documents(shard_dir, docs, tok):
    ref = Corpus.from_documents("ref", docs, tok)
    got = load_shard(str(shard_dir), tok.fingerprint)
    assert got.tokens.dtype == ref.tokens.dtype
    np.testing.assert_array_equal(np.asarray(got.tokens), ref.tokens)
    np.testing.assert_array_equal(got.doc_offsets, ref.doc_offsets)
    return ref, got


# ------------------------------------------------------------------------ the shard
def test_prepare_equals_corpus_from_documents(tmp_path, jsonl_inputs):
    _, docs = jsonl_inputs
    out = tmp_path / "shard"
    # a 4 KB chunk: several chunks per file, and chunks holding pieces of two files
    s = prepare([str(tmp_path / "in" / "*.jsonl")], str(out), chunk_bytes=4096, progress=False)
    assert s["chunks"] > 5 and s["processed"] == s["chunks"] and s["n_docs"] == len(docs)
    assert sorted(os.listdir(out)) == ["docs.npy", "meta.json", "tokens.bin"]  # parts/ and the lock are gone
    tok = ByteTokenizer()
    ref, _ = assert_equals_from_documents(out, docs, tok)
    # byte for byte the files write_shard makes of the same corpus; meta.json adds only the inputs digest
    write_shard(str(tmp_path / "ref"), Corpus("shard", ref.tokens, ref.doc_offsets), tok.fingerprint)
    a, b = shard_bytes(out), shard_bytes(tmp_path / "ref")
    assert a["tokens.bin"] == b["tokens.bin"] and a["docs.npy"] == b["docs.npy"]
    meta_a, meta_b = json.loads(a["meta.json"]), json.loads(b["meta.json"])
    assert set(meta_a) - set(meta_b) == {"inputs"}
    assert {k: meta_a[k] for k in meta_b} == meta_b


def test_worker_count_does_not_change_the_shard(tmp_path, jsonl_inputs):
    paths, _ = jsonl_inputs
    one = prepare(paths, str(tmp_path / "w1" / "c"), workers=1, chunk_bytes=8192, progress=False)
    two = prepare(paths, str(tmp_path / "w2" / "c"), workers=2, chunk_bytes=8192, progress=False)
    assert one["chunks"] == two["chunks"] > 2
    assert shard_bytes(tmp_path / "w1" / "c") == shard_bytes(tmp_path / "w2" / "c")
    # nor does the chunk size
    prepare(paths, str(tmp_path / "big" / "c"), chunk_bytes=1 << 30, progress=False)
    assert shard_bytes(tmp_path / "big" / "c") == shard_bytes(tmp_path / "w1" / "c")


def test_cli_writes_a_shard_the_trainer_reads(tmp_path, jsonl_inputs, capsys):
    paths, docs = jsonl_inputs
    out = tmp_path / "cli"
    assert main(["--input", paths[0], "--input", *paths[1:], "--out", str(out), "--workers", "1",
                 "--name", "mix", "--no-progress"]) == 0
    assert f"{len(docs)} documents" in capsys.readouterr().out
    assert load_shard(str(out)).name == "mix"
    # an identical rerun has nothing to do; other inputs need --overwrite
    assert main(["--input", *paths, "--out", str(out), "--name", "mix", "--no-progress"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["--input", paths[0], "--out", str(out), "--name", "mix", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(out / "meta.json") in err and "--overwrite" in err
    assert main(["--input", paths[0], "--out", str(out), "--name", "mix", "--no-progress", "--overwrite"]) == 0
    assert load_shard(str(out)).doc_offsets.size == len(documents()[0]) + 1


def test_identical_rerun_remakes_a_damaged_shard(tmp_path, jsonl_inputs):
    paths, _ = jsonl_inputs
    out = tmp_path / "out"
    prepare(paths, str(out), progress=False)
    good = shard_bytes(out)
    assert prepare(paths, str(out), progress=False).get("up_to_date")
    with open(out / "tokens.bin", "r+b") as f:
        f.truncate(100)
    s = prepare(paths, str(out), progress=False)
    assert not s.get("up_to_date") and s["processed"] == s["chunks"]
    assert shard_bytes(out) == good


def test_one_writer_per_directory(tmp_path, jsonl_inputs):
    import fcntl

    paths, _ = jsonl_inputs
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".prepare.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(PrepareError, match="another python -m train.prepare"):
            prepare(paths, str(out), progress=False)
    prepare(paths, str(out), progress=False)
    assert not (out / ".prepare.lock").exists()


# ------------------------------------------------------------------------ restarts
class Interrupt(Exception):
    pass


def stop_after(n):
    seen = []

    def hook(i):
        seen.append(i)
        if len(seen) == n:
            raise Interrupt

    return hook


def parts_of(out):
    return sorted(f for f in os.listdir(out / "parts") if f.endswith(".npz"))


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_run_resumes_without_redoing_chunks(tmp_path, jsonl_inputs, workers):
    paths, _ = jsonl_inputs
    straight = tmp_path / "straight" / "out"
    prepare(paths, str(straight), chunk_bytes=4096, progress=False)
    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        prepare(paths, str(out), workers=workers, chunk_bytes=4096, progress=False, on_chunk=stop_after(3))
    assert not (out / "meta.json").exists()  # an interrupted shard never looks complete
    with pytest.raises(ShardError, match="meta.json"):
        load_shard(str(out))
    done = parts_of(out)
    assert len(done) >= 3
    stamps = {f: os.stat(out / "parts" / f).st_mtime_ns for f in done}
    (out / "parts" / "000099.npz.1234.tmp").write_bytes(b"half a part")  # a write cut short
    seen = []

    def check(i):
        if not seen:  # the finished parts are still there, untouched
            assert {f: os.stat(out / "parts" / f).st_mtime_ns for f in done} == stamps
        seen.append(i)

    s = prepare(paths, str(out), workers=workers, chunk_bytes=4096, progress=False, on_chunk=check)
    assert s["skipped"] == len(done) and s["processed"] == s["chunks"] - len(done) == len(seen)
    assert not {f"{i:06d}.npz" for i in seen} & set(done)  # finished chunks were not redone
    assert shard_bytes(out) == shard_bytes(straight)


def test_rerun_after_losing_the_final_files_redoes_only_missing_parts(tmp_path, jsonl_inputs):
    paths, _ = jsonl_inputs
    out = tmp_path / "out"

    def stop_at_last(i):
        with open(out / "parts" / "plan.json") as f:
            if i == json.load(f)["chunks"] - 1:
                raise Interrupt

    with pytest.raises(Interrupt):  # every chunk done (in order, one worker), stopped before assembling
        prepare(paths, str(out), chunk_bytes=4096, progress=False, on_chunk=stop_at_last)
    parts = parts_of(out)
    n = len(parts)
    os.remove(out / "parts" / parts[1])
    with open(out / "parts" / parts[4], "r+b") as f:  # a torn part (e.g. a crash before the disk flush)
        f.truncate(20)
    # half-assembled outputs from an earlier attempt are replaced
    (out / "tokens.bin").write_bytes(b"junk")
    (out / "docs.npy").write_bytes(b"junk")
    seen = []
    s = prepare(paths, str(out), chunk_bytes=4096, progress=False, on_chunk=seen.append)
    assert sorted(seen) == [1, 4] and s["skipped"] == n - 2 and s["chunks"] == n
    ref = tmp_path / "ref" / "out"
    prepare(paths, str(ref), chunk_bytes=4096, progress=False)
    assert shard_bytes(out) == shard_bytes(ref)


def test_a_corrupt_part_is_named_removed_and_remade(tmp_path, jsonl_inputs):
    paths, docs = jsonl_inputs
    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        prepare(paths, str(out), chunk_bytes=4096, progress=False, on_chunk=stop_after(4))
    part = out / "parts" / parts_of(out)[2]
    b = bytearray(part.read_bytes())
    b[len(b) // 2] ^= 0x01  # inside the tokens: the zip CRC catches it when the part is assembled
    part.write_bytes(bytes(b))
    with pytest.raises(PrepareError, match=rf"{part}: corrupt part .*rerun"):
        prepare(paths, str(out), chunk_bytes=4096, progress=False)
    assert not part.exists() and not (out / "meta.json").exists()
    seen = []
    prepare(paths, str(out), chunk_bytes=4096, progress=False, on_chunk=seen.append)
    assert seen == [2]
    assert_equals_from_documents(out, docs, ByteTokenizer())


def test_parts_from_other_inputs_are_discarded(tmp_path, jsonl_inputs):
    paths, _ = jsonl_inputs
    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        prepare(paths, str(out), chunk_bytes=4096, progress=False, on_chunk=stop_after(2))
    s = prepare(paths[:1], str(out), chunk_bytes=4096, progress=False)  # other inputs: the old parts are stale
    assert s["skipped"] == 0
    assert_equals_from_documents(out, documents()[0], ByteTokenizer())


def test_sigkill_mid_run_then_rerun(tmp_path):
    """A real kill -9 of python -m train.prepare, then the same command again."""
    docs = bundled.documents("abstracts", 0) + bundled.documents("replay", 0)
    path = write_jsonl(tmp_path / "in.jsonl", docs)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "train.prepare", "--input", path, "--out", str(out), "--workers", "1",
           "--chunk-mb", str(2048 / 2 ** 20), "--no-progress"]  # ~200 chunks of 2 KB
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if (out / "parts").is_dir() and len(parts_of(out)) >= 5:
            break
        time.sleep(0.005)
    if proc.poll() is not None:
        pytest.fail(f"prepare finished before it could be killed: {proc.communicate()[1][-500:]!r}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "meta.json").exists()
    n_done = len(parts_of(out))
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"({n_done} already done)" in rerun.stdout
    assert_equals_from_documents(out, docs, ByteTokenizer())


# ------------------------------------------------------------------------ text files
def test_txt_one_document_per_file(tmp_path):
    d = tmp_path / "txt"
    d.mkdir()
    (d / "a.txt").write_bytes(b"\xef\xbb\xbf\n\nFirst line\r\n\r\n  indented second paragraph  \r\n\n\n")
    (d / "b.txt").write_bytes("no trailing newline: ü".encode())
    (d / "c.txt").write_bytes(b"  \n\t\n")  # nothing but whitespace: no document
    (d / "d.txt").write_bytes(b"")
    prepare([str(d / "*.txt")], str(tmp_path / "s"), progress=False)
    docs = ["First line\n\n  indented second paragraph  ", "no trailing newline: ü"]
    assert_equals_from_documents(tmp_path / "s", docs, ByteTokenizer())


def test_txt_one_document_per_paragraph(tmp_path):
    paras = [f"Paragraph {i} line one.\nline two of {i}  " + " filler" * (i % 7) for i in range(120)]
    seps = ["\n\n", "\n\n\n", "\n  \t\n", "\r\n\r\n"]
    text = "\n\n" + "".join(p + seps[i % 4] for i, p in enumerate(paras)) + "last one without newline"
    path = tmp_path / "p.txt"
    path.write_bytes(text.encode())
    expected = [p for p in paras] + ["last one without newline"]
    # small chunks: the cuts fall inside paragraphs and must move to the next blank line
    for chunk in (100, 1 << 20):
        out = tmp_path / f"s{chunk}"
        s = prepare([str(path)], str(out), txt_docs="paragraph", chunk_bytes=chunk, progress=False)
        assert s["chunks"] > 20 if chunk == 100 else s["chunks"] == 1
        assert_equals_from_documents(out, expected, ByteTokenizer())


# ------------------------------------------------------------------------ bad input
def bad_jsonl(tmp_path, lines):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


BAD_LINES = [
    (['{"text": "ok"}', '{"text": "ok"}', '{"text": "broken'], r"bad\.jsonl:3: invalid JSON"),
    (['{"text": "ok"}', "", '{"body": "no text key"}'], r"bad\.jsonl:3: no 'text' key .*'body'.*--text-key"),
    (['{"text": 5}'], r"bad\.jsonl:1: 'text' holds a int, expected a string"),
    (['{"text": "a"}', '["a list"]'], r"bad\.jsonl:2: expected a JSON object, got list"),
    (['{"text": "a lone surrogate \\ud800"}'], r"bad\.jsonl:1: 'text' is not valid Unicode"),
]


@pytest.mark.parametrize("lines, message", BAD_LINES)
def test_bad_jsonl_lines_are_named(tmp_path, lines, message):
    good = write_jsonl(tmp_path / "good.jsonl", ["fine"] * 50)
    with pytest.raises(PrepareError, match=message):
        # 64-byte chunks: the bad line sits in a later chunk than the start of its file
        prepare([good, bad_jsonl(tmp_path, lines)], str(tmp_path / "out"), chunk_bytes=64, progress=False)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_bad_line_found_by_a_worker_process(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", ["fine"] * 50)
    lines, message = BAD_LINES[0]
    with pytest.raises(PrepareError, match=message):
        prepare([good, bad_jsonl(tmp_path, lines)], str(tmp_path / "out"), workers=2, chunk_bytes=64, progress=False)


def test_bad_inputs_are_named(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(PrepareError, match="missing.jsonl: no such file"):
        prepare([str(tmp_path / "missing.jsonl")], out, progress=False)
    with pytest.raises(PrepareError, match=r"nothing\*\.jsonl.*no file matches"):
        prepare([str(tmp_path / "nothing*.jsonl")], out, progress=False)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(PrepareError, match=r"data\.csv: unknown input format"):
        prepare([str(tmp_path / "data.csv")], out, progress=False)
    with pytest.raises(PrepareError, match="is a directory"):
        prepare([str(tmp_path)], out, progress=False)
    (tmp_path / "latin1.txt").write_bytes(b"line one\ncaf\xe9\n")
    with pytest.raises(PrepareError, match=r"latin1\.txt:2: not valid UTF-8"):
        prepare([str(tmp_path / "latin1.txt")], out, progress=False)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(PrepareError, match="no documents"):
        prepare([str(tmp_path / "empty.jsonl")], out, progress=False)
    (tmp_path / "k.jsonl").write_text('{"body": "x"}\n')
    prepare([str(tmp_path / "k.jsonl")], str(tmp_path / "k"), text_key="body", progress=False)
    assert_equals_from_documents(tmp_path / "k", ["x"], ByteTokenizer())


def test_cli_error_names_the_file(tmp_path, capsys):
    path = bad_jsonl(tmp_path, ['{"text": "ok"}', "not json"])
    assert main(["--input", path, "--out", str(tmp_path / "o"), "--workers", "1", "--no-progress"]) == 2
    assert f"{path}:2: invalid JSON" in capsys.readouterr().err


# ------------------------------------------------------------------------ real tokenizers, built offline
@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    text = bundled.documents("guidelines", 0, 150) + bundled.documents("replay", 0, 50)
    return build_tokenizer_files(tmp_path_factory.mktemp("tok"), text, sp_vocab=600, bpe_vocab=500)


SAMPLE = "Metformin 500 mg twice daily.\nHéllo wörld 😀 中文  two  spaces\ttab "


def test_real_tokenizers_round_trip(tokenizer_files):
    sp, hf, byte = (load_tokenizer(tokenizer_files["sentencepiece"]), load_tokenizer(tokenizer_files["hf"]),
                    load_tokenizer("byte"))
    assert (sp.bos_id, sp.eos_id, sp.vocab_size) == (1, 2, 600)
    assert (hf.bos_id, hf.eos_id, hf.vocab_size) == (1, 2, 500)
    for tok in (sp, hf, byte):
        ids = tok.encode(SAMPLE)
        assert tok.decode(ids) == SAMPLE
        assert all(0 <= i < tok.vocab_size for i in ids) and tok.bos_id not in ids and tok.eos_id not in ids
        assert tok.encode_batch([SAMPLE, "", "x y"]) == [ids, tok.encode(""), tok.encode("x y")]
    # the trained vocabularies compress the text they were trained on
    guideline = bundled.documents("guidelines", 0, 1)[0]
    assert len(sp.encode(guideline)) < len(guideline) / 2 and len(hf.encode(guideline)) < len(guideline) / 2
    assert len({sp.fingerprint, hf.fingerprint, byte.fingerprint}) == 3
    # a directory means its tokenizer.model (Llama-2's own), else its tokenizer.json
    assert load_tokenizer(os.path.dirname(tokenizer_files["hf"])).fingerprint == hf.fingerprint


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
def test_prepare_with_real_tokenizer(tmp_path, tokenizer_files, jsonl_inputs, kind):
    paths, docs = jsonl_inputs
    spec = tokenizer_files[kind]
    tok = load_tokenizer(spec)
    out = tmp_path / kind
    prepare(paths, str(out), tokenizer=spec, chunk_bytes=8192, progress=False)
    assert_equals_from_documents(out, docs, tok)
    # a shard is never read with another tokenizer
    for other in [load_tokenizer("byte"), load_tokenizer(tokenizer_files["hf" if kind == "sentencepiece" else
                                                                          "sentencepiece"])]:
        with pytest.raises(ShardError, match=rf"{out / 'meta.json'}: made with tokenizer"):
            load_shard(str(out), other.fingerprint)


def test_bad_tokenizer_files_are_named(tmp_path):
    (tmp_path / "junk.model").write_bytes(b"not a model")
    (tmp_path / "junk.json").write_text("{}")
    for name in ("junk.model", "junk.json"):
        with pytest.raises(ValueError, match=name):
            load_tokenizer(str(tmp_path / name))
    with pytest.raises(ValueError, match="nope.model"):
        load_tokenizer(str(tmp_path / "nope.model"))
    with pytest.raises(ValueError, match="without tokenizer.model or tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_trainer_runs_on_prepared_shards(tmp_path, tokenizer_files):
    """prepare -> data.paths / data.weights / data.tokenizer -> a few optimizer steps."""
    from train.config import Config
    from train.trainer import run

    spec = tokenizer_files["hf"]  # 500 tokens: fits the tiny model's 512
    shards = []
    for name in ("abstracts", "replay"):
        path = write_jsonl(tmp_path / f"{name}.jsonl", bundled.documents(name, 0, 60))
        prepare([path], str(tmp_path / name), tokenizer=spec, progress=False)
        shards.append(str(tmp_path / name))
    cfg = Config()
    cfg.out_dir = str(tmp_path / "run")
    cfg.data.paths, cfg.data.weights, cfg.data.tokenizer = shards, [0.8, 0.2], spec
    t = cfg.training
    t.steps, t.micro_batch, t.global_batch, t.seq_len, t.warmup_steps = 2, 2, 2, 32, 1
    cfg.metrics.log_interval, cfg.checkpoint.interval, cfg.eval.interval, cfg.eval.batches = 1, 0, 2, 1
    rows = run(cfg, progress=False)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in rows) and abs(rows[0]["loss"] - np.log(512)) < 1.0
    assert np.isfinite(rows[-1]["val_loss"])
    cfg.data.tokenizer = "byte"  # shards made with the BPE are refused under another tokenizer
    cfg.out_dir = str(tmp_path / "run-byte")  # a new run: the first one owns its directory
    with pytest.raises(ShardError, match="made with tokenizer"):
        run(cfg, progress=False)


def test_hf_tokenizer_without_bos_uses_its_end_of_text(tmp_path):
    """GPT-2 style vocabularies have only <|endoftext|>: it both opens and closes a document."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(bundled.documents("replay", 0, 20), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bpe.save(str(tmp_path / "gpt2.json"))
    tok = load_tokenizer(str(tmp_path / "gpt2.json"))
    assert tok.bos_id == tok.eos_id == 0
    bare = Tokenizer(models.BPE())
    bare.save(str(tmp_path / "bare.json"))
    with pytest.raises(ValueError, match=r"bare\.json.*no end-of-text token"):
        load_tokenizer(str(tmp_path / "bare.json"))
