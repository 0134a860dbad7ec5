"""The blend (mixture, order, resume, epochs, split), packed batches, and shard checks."""
import json
import os

import numpy as np
import pytest

from train.config import Config
from train.data import Blend, Corpus, ShardError, bundled_corpora, load_shard, make_batch, write_shard
from model.tokenizer import ByteTokenizer


def corpus_of_lengths(name, lengths, base=100) -> Corpus:
    """Tokens base, base + 1, ... (distinct from -100 and from positions), documents of the given lengths."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Corpus(name, np.arange(base, base + offsets[-1], dtype=np.uint16), offsets)


def random_corpus(name, n_docs, seed, max_len=40) -> Corpus:
    rng = np.random.default_rng(seed)
    return corpus_of_lengths(name, rng.integers(1, max_len, n_docs), base=rng.integers(0, 1000))


@pytest.fixture(scope="module")
def three():
    return [random_corpus(f"c{i}", 300 + 100 * i, i) for i in range(3)]


# ------------------------------------------------------------------------ the mixture
@pytest.mark.parametrize("weights", [[0.7, 0.2, 0.1], [1, 1, 1], [0.5, 0.0, 0.5], [0.0, 0.0, 1.0], [0.98, 0.01, 0.01],
                                     [3, 1, 0], [0.4, 0.3, 0.2]])
@pytest.mark.parametrize("seed, start", [(0, 0), (7, 123_457)])
def test_realised_mixture_matches_weights(three, weights, seed, start):
    blend = Blend(three, weights, seq_len=8, seed=seed, val_fraction=0.1)
    n = 10_000
    picked = np.array([c for c, _ in blend.samples(start, n)])
    share = np.bincount(picked, minlength=3) / n
    w = np.asarray(weights, dtype=float) / sum(weights)
    assert np.all(np.abs(share - w) <= 0.01), (share, w)
    assert np.all(share[w == 0] == 0)  # a zero weight is never drawn, not even once


def test_rounding_never_feeds_a_trailing_zero_weight():
    # ten weights of 0.1 sum to 0.9999999999999999 in floating point: the sliver up to 1.0 must
    # still belong to the last positive-weight corpus, not to the zero-weight one after it
    corpora = [random_corpus(f"c{i}", 20, i) for i in range(11)]
    blend = Blend(corpora, [0.1] * 10 + [0.0], seq_len=4, seed=0, val_fraction=0.0)
    assert np.cumsum(blend.weights)[9] < 1.0
    assert np.searchsorted(blend._cum, np.nextafter(1.0, 0.0), side="right") == 9


def test_bundled_mixture_matches_its_weights():
    corpora, weights = bundled_corpora(ByteTokenizer())
    blend = Blend(corpora, weights, seq_len=64, seed=3, val_fraction=0.05)
    picked = np.array([c for c, _ in blend.samples(0, 10_000)])
    assert np.all(np.abs(np.bincount(picked, minlength=4) / 10_000 - np.asarray(weights)) <= 0.01)


# ------------------------------------------------------------------------ order, resume, epochs
def test_order_is_deterministic_per_seed(three):
    w = [0.5, 0.3, 0.2]
    a = Blend(three, w, 8, seed=1, val_fraction=0.1).samples(0, 2000)
    assert Blend(three, w, 8, seed=1, val_fraction=0.1).samples(0, 2000) == a
    b = Blend(three, w, 8, seed=2, val_fraction=0.1).samples(0, 2000)
    assert b != a
    assert [c for c, _ in b] != [c for c, _ in a]  # both which corpus and which window change
    same_corpus = [(x, y) for x, y in zip(a, b) if x[0] == y[0]]
    assert sum(x != y for x, y in same_corpus) > 0.9 * len(same_corpus)


def test_reading_in_pieces_and_resuming_equals_one_read(three):
    w = [0.6, 0.25, 0.15]
    whole = Blend(three, w, 8, seed=5, val_fraction=0.1).samples(0, 3000)
    pieces = Blend(three, w, 8, seed=5, val_fraction=0.1)
    got = []
    for a, b in [(0, 1), (1, 8), (8, 1000), (1000, 1001), (1001, 3000)]:
        got += pieces.samples(a, b - a)
    assert got == whole
    assert pieces.samples(17, 40) == whole[17:57]  # reading backwards after reading forwards
    fresh = Blend(three, w, 8, seed=5, val_fraction=0.1)  # a resumed run: a new Blend, mid-stream
    assert fresh.samples(1500, 1500) == whole[1500:]
    # far into training (several epochs of every corpus): a fresh Blend agrees with one that read up to there
    far = 1_000_000
    x, y = Blend(three, w, 8, seed=5, val_fraction=0.1), Blend(three, w, 8, seed=5, val_fraction=0.1)
    x.samples(far - 300, 10)
    assert x.samples(far, 64) == y.samples(far, 64)
    assert Blend(three, w, 8, seed=5, val_fraction=0.1).samples(far - 10, 74)[10:] == y.samples(far, 64)


def test_epochs_wrap_and_reshuffle():
    c = random_corpus("one", 200, 0)
    L = 8
    blend = Blend([c], [1.0], L, seed=0, val_fraction=0.0)
    n = blend.ranges[0][1]
    assert n == (len(c.tokens) - 1) // L
    starts = [s for _, s in blend.samples(0, 3 * n)]
    epochs = [starts[i * n:(i + 1) * n] for i in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(0, n * L, L))  # every window exactly once per epoch
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    # with several corpora each wraps on its own count of draws
    d = random_corpus("two", 30, 1)
    mix = Blend([c, d], [0.5, 0.5], L, seed=0, val_fraction=0.0)
    n_d = mix.ranges[1][1]
    from_d = [s for k, s in mix.samples(0, 6 * n_d) if k == 1]
    assert len(from_d) >= 2 * n_d
    assert sorted(from_d[:n_d]) == sorted(from_d[n_d:2 * n_d]) == list(range(0, n_d * L, L))
    assert from_d[:n_d] != from_d[n_d:2 * n_d]


def test_train_and_val_never_overlap(three):
    L = 8
    for frac in (0.05, 0.1, 0.5):
        train = Blend(three, [1, 1, 1], L, seed=0, val_fraction=frac, split="train")
        val = Blend(three, [1, 1, 1], L, seed=0, val_fraction=frac, split="val")
        for k, c in enumerate(three):
            val_start, end = c.split(frac)
            assert val_start in set(c.doc_offsets.tolist())  # a document boundary
            n_docs = len(c.doc_offsets) - 1
            assert abs((n_docs - np.searchsorted(c.doc_offsets, val_start)) - frac * n_docs) <= 1
            lo, n = train.ranges[k]
            train_tokens = {t for s in range(lo, lo + n * L, L) for t in range(s, s + L + 1)}  # inputs and targets
            lo, n = val.ranges[k]
            val_tokens = {t for s in range(lo, lo + n * L, L) for t in range(s, s + L + 1)}
            assert max(train_tokens) < val_start <= min(val_tokens) and max(val_tokens) < end
        for blend, inside in ((train, lambda s, vs: s + L < vs), (val, lambda s, vs: s >= vs)):
            for k, s in blend.samples(0, 3000):
                assert inside(s, three[k].split(frac)[0])


def test_blend_rejects_bad_arguments(three):
    with pytest.raises(ValueError, match="weights"):
        Blend(three, [1, 1], 8, 0, 0.1)
    with pytest.raises(ValueError, match="weights"):
        Blend(three, [1, -1, 1], 8, 0, 0.1)
    with pytest.raises(ValueError, match="weights"):
        Blend(three, [0, 0, 0], 8, 0, 0.1)
    with pytest.raises(ValueError, match="split"):
        Blend(three, [1, 1, 1], 8, 0, 0.1, split="test")
    tiny = corpus_of_lengths("tiny", [3, 3])
    with pytest.raises(ValueError, match="'tiny' has 6 train tokens"):
        Blend([three[0], tiny], [1, 1], 8, 0, 0.0)
    Blend([three[0], tiny], [1, 0], 8, 0, 0.0).samples(0, 100)  # a zero-weight corpus may be too small


# ------------------------------------------------------------------------ packed batches
def reference_rows(c: Corpus, s: int, L: int):
    """Inputs, masked targets and segment lengths of the window at s, from document ids."""
    doc = np.searchsorted(c.doc_offsets, np.arange(s, s + L + 1), side="right") - 1
    inp = c.tokens[s:s + L].astype(np.int64)
    tgt = c.tokens[s + 1:s + L + 1].astype(np.int64)
    tgt[doc[1:] != doc[:-1]] = -100
    cuts = np.flatnonzero(np.diff(doc[:L])) + 1
    return inp, tgt, np.diff(np.concatenate([[0], cuts, [L]]))


def by_start(blend, start, count):
    return [s for _, s in blend.samples(start, count)]


def test_make_batch_on_a_hand_made_corpus():
    # documents [0,1) [1,4) [4,5) [5,6) [6,12) [12,14) [14,15) [15,20); tokens 100..119; windows of 4
    c = corpus_of_lengths("hand", [1, 3, 1, 1, 6, 2, 1, 5])
    blend = Blend([c], [1.0], 4, seed=0, val_fraction=0.0)
    expected = {  # window start: (targets, segment lengths)
        0: ([-100, 102, 103, -100], [1, 3]),      # a 1-token document, then one that runs past the window
        4: ([-100, -100, 107, 108], [1, 1, 2]),   # two 1-token documents
        8: ([109, 110, 111, -100], [4]),          # the next document starts right after the window
        12: ([113, -100, -100, 116], [2, 1, 1]),  # a document continued from the previous window
    }
    rows = by_start(blend, 0, 4)
    assert sorted(rows) == [0, 4, 8, 12]
    batch = make_batch(blend, 0, 4, pack=True)
    cu = [0]
    for r, s in enumerate(rows):
        tgt, segs = expected[s]
        assert batch["tokens"][r].tolist() == list(range(100 + s, 104 + s))
        assert batch["targets"][r].tolist() == tgt
        cu += (cu[-1] + np.cumsum(segs)).tolist()
    assert batch["cu_seqlens"].tolist() == cu and batch["cu_seqlens"].dtype == __import__("torch").int32
    assert batch["max_seqlen"] == 4
    one = make_batch(blend, rows.index(4), 1, pack=True)
    assert one["cu_seqlens"].tolist() == [0, 1, 2, 4] and one["max_seqlen"] == 2
    plain = make_batch(blend, 0, 4, pack=False)
    assert set(plain) == {"tokens", "targets"}
    assert (plain["targets"] >= 100).all()  # unpacked: plain next-token targets everywhere
    assert plain["tokens"].tolist() == batch["tokens"].tolist()


@pytest.mark.parametrize("L", [1, 2, 5, 16])
def test_make_batch_matches_document_ids(L):
    # many 1-token documents, and long ones crossing several window edges
    lengths = [1, 1, 1, 7, 1, 2, 40, 1, 3, 3, 1, 1, 25, 1, 2, 9, 1]
    c = corpus_of_lengths("mixed", lengths * 3)
    blend = Blend([c], [1.0], L, seed=1, val_fraction=0.0)
    n = blend.ranges[0][1]
    for start in range(0, n, 7):
        count = min(7, n - start)
        batch = make_batch(blend, start, count, pack=True, ignore_index=-100)
        cu, max_len = [0], 0
        for r, s in enumerate(by_start(blend, start, count)):
            inp, tgt, segs = reference_rows(c, s, L)
            assert batch["tokens"][r].tolist() == inp.tolist()
            assert batch["targets"][r].tolist() == tgt.tolist()
            cu += (r * L + np.cumsum(segs)).tolist()
            max_len = max(max_len, int(segs.max()))
        assert batch["cu_seqlens"].tolist() == cu
        assert batch["max_seqlen"] == max_len


# ------------------------------------------------------------------------ shards on disk
@pytest.fixture
def shard(tmp_path):
    c = random_corpus("s", 50, 3)
    path = tmp_path / "shard"
    write_shard(str(path), c, "byte-v1")
    return path, c


def test_shard_round_trip(shard):
    path, c = shard
    got = load_shard(str(path), "byte-v1")
    assert got.name == "s" and isinstance(got.tokens, np.memmap) and not got.tokens.flags.writeable
    np.testing.assert_array_equal(got.tokens, c.tokens)
    np.testing.assert_array_equal(got.doc_offsets, c.doc_offsets)


def _truncate(p):
    with open(p / "tokens.bin", "r+b") as f:
        f.truncate(os.path.getsize(p / "tokens.bin") - 2)
    return "tokens.bin", "truncated"


def _flip(p):
    b = bytearray((p / "tokens.bin").read_bytes())
    b[len(b) // 2] ^= 0x10
    (p / "tokens.bin").write_bytes(bytes(b))
    return "tokens.bin", "checksum"


def _meta(edit, expect, names="meta.json"):
    def f(p):
        meta = json.loads((p / "meta.json").read_text())
        (p / "meta.json").write_text(json.dumps(edit(meta)))
        return names, expect
    return f


def _set(key, value, expect, names="meta.json"):
    return _meta(lambda m: {**m, key: value}, expect, names)


def _drop(key):
    return _meta(lambda m: {k: v for k, v in m.items() if k != key}, f"'{key}' missing")


def _write(name, data, expect):
    def f(p):
        if data is None:
            os.remove(p / name)
        else:
            (p / name).write_bytes(data)
        return name, expect
    return f


def _index(edit):
    def f(p):
        np.save(p / "docs.npy", edit(np.load(p / "docs.npy")))
        return "docs.npy", "does not match"
    return f


CORRUPTIONS = {  # kind: corrupt(shard dir) -> (the file the error must name, what it must say)
    "truncated tokens": _truncate,
    "flipped byte": _flip,
    "index too short": _index(lambda o: o[:-1]),
    "index ends early": _index(lambda o: np.concatenate([o[:-1], [o[-1] - 1]])),
    "index not increasing": _index(lambda o: o[[0, 2, 1] + list(range(3, len(o)))]),
    "index repeats an offset": _index(lambda o: np.concatenate([o[:2], o[1:2], o[2:-2], o[-1:]])),  # an empty document
    "index of floats": _index(lambda o: o.astype(np.float64)),
    "index 2-d": _index(lambda o: o[None]),
    "index garbage": _write("docs.npy", b"garbage", "unreadable"),
    "index empty": _write("docs.npy", b"", "unreadable"),
    "index missing": _write("docs.npy", None, "missing"),
    "tokens missing": _write("tokens.bin", None, "missing"),
    "meta missing": _write("meta.json", None, "missing"),
    "meta not json": _write("meta.json", b'{"format": ', "not valid JSON"),
    "meta not utf-8": _write("meta.json", b"\xff\xfe{", "not valid JSON"),
    "meta a list": _write("meta.json", b"[1, 2]", "expected a JSON object"),
    "meta other format": _set("format", "other-v9", "format 'other-v9'"),
    "meta without dtype": _drop("dtype"),
    "meta without crc": _drop("crc32"),
    "meta bad dtype": _set("dtype", "float32", "dtype 'float32'"),
    "meta n_tokens a string": _set("n_tokens", "12", "'n_tokens' missing or not a int"),
    "meta empty shard": _set("n_docs", 0, "empty shard"),
    "meta more tokens": _meta(lambda m: {**m, "n_tokens": m["n_tokens"] + 1}, "truncated or corrupt", "tokens.bin"),
    "meta more documents": _meta(lambda m: {**m, "n_docs": m["n_docs"] + 1}, "does not match", "docs.npy"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_shard_is_rejected_naming_the_file(shard, kind):
    path, _ = shard
    name, expect = CORRUPTIONS[kind](path)
    with pytest.raises(ShardError, match=expect) as e:
        load_shard(str(path), "byte-v1")
    assert str(e.value).startswith(str(path / name)), str(e.value)


def test_verify_size_skips_only_the_checksum(shard):
    path, c = shard
    _flip(path)
    with pytest.raises(ShardError, match="checksum"):
        load_shard(str(path), verify="full")
    got = load_shard(str(path), verify="size")  # sizes and the index still match: accepted, unread
    assert len(got.tokens) == len(c.tokens)
    _truncate(path)
    with pytest.raises(ShardError, match="truncated"):
        load_shard(str(path), verify="size")
    with pytest.raises(ValueError, match="verify"):
        load_shard(str(path), verify="none")


def test_wrong_tokenizer_is_rejected(shard):
    path, _ = shard
    with pytest.raises(ShardError, match=rf"{path / 'meta.json'}: made with tokenizer 'byte-v1'"):
        load_shard(str(path), "sentencepiece-0123456789abcdef")


def test_trainer_start_up_checks_shards(shard):
    """data.paths / data.verify as the trainer reads them: a corrupt shard fails before training."""
    from train.trainer import load_data

    path, _ = shard
    cfg = Config()
    cfg.data.paths = [str(path), str(path)]
    cfg.data.weights = [0.75, 0.25]
    cfg.training.seq_len = 16
    train, val = load_data(cfg, ByteTokenizer())
    assert train.weights.tolist() == [0.75, 0.25] and val is not None
    _flip(path)
    with pytest.raises(ShardError, match=str(path / "tokens.bin")):
        load_data(cfg, ByteTokenizer())
    cfg.data.verify = "size"
    load_data(cfg, ByteTokenizer())
