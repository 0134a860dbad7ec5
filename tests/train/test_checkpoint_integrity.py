"""Checkpoint manifests, corruption, fallback and run ownership: a kill-and-corrupt matrix on
one tiny run (checkpoints at steps 2 and 4), each case resumed from a copy of it."""
import json
import os
import shutil

import pytest

from train import checkpoint as ckpt
from train.config import Config, ConfigError
from train.trainer import run

from tests.helpers import tiny_run_config


def tiny(out_dir, steps=4) -> Config:
    return tiny_run_config(out_dir, steps, checkpoint_interval=2, decay_steps=6)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4, and an unbroken 6-step run's metrics."""
    out = tmp_path_factory.mktemp("base") / "run"
    run(tiny(out), progress=False)
    straight = run(tiny(tmp_path_factory.mktemp("straight") / "run", steps=6), progress=False)
    return out, straight


def flip(path, offset_fraction=0.5, n=4000):
    size = os.path.getsize(path)
    start = min(int(size * offset_fraction), max(size - n, 0))
    with open(path, "r+b") as f:
        f.seek(start)
        data = bytearray(f.read(n))
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in data))


def truncate(path, keep=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


def remove(path):
    os.remove(path)


CASES = {
    "flipped-bytes-distcp": ("state/__0_0.distcp", flip, "state/__0_0.distcp: sha256 does not match"),
    "flipped-one-byte-distcp": ("state/__0_0.distcp", lambda p: flip(p, 0.9, 1), "state/__0_0.distcp: sha256"),
    "truncated-distcp": ("state/__0_0.distcp", truncate, "state/__0_0.distcp has"),
    "missing-distcp": ("state/__0_0.distcp", remove, "state/__0_0.distcp missing"),
    "truncated-metadata": ("state/.metadata", truncate, "state/.metadata has"),
    "truncated-extra": ("extra_rank0.pt", truncate, "extra_rank0.pt has"),
    "empty-extra": ("extra_rank0.pt", lambda p: truncate(p, 0), "extra_rank0.pt has 0 bytes"),
    "truncated-meta": ("meta.json", truncate, "meta.json has"),
    "flipped-meta": ("meta.json", lambda p: flip(p, 0.5, 1), "meta.json: sha256"),
    "missing-manifest": ("manifest.json", remove, "manifest.json missing"),
    "truncated-manifest": ("manifest.json", truncate, "manifest.json unreadable"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_corrupt_checkpoint_is_named_and_skipped(base, tmp_path, case):
    src, _ = base
    rel, damage, message = CASES[case]
    out = tmp_path / "run"
    shutil.copytree(src, out)
    newest = out / "checkpoints" / "step_00000004"
    damage(str(newest / rel))
    problem = ckpt.verify(str(newest))
    assert problem is not None and message in problem
    path, rejected = ckpt.newest_valid(ckpt.complete_checkpoints(str(out / "checkpoints")))
    assert path == str(out / "checkpoints" / "step_00000002")
    assert len(rejected) == 1 and rejected[0].startswith("step_00000004: ") and message in rejected[0]


@pytest.mark.parametrize("case", ["flipped-bytes-distcp", "truncated-meta", "missing-manifest"])
def test_resume_falls_back_to_the_newest_good_checkpoint_exactly(base, tmp_path, capsys, case):
    src, straight = base
    rel, damage, message = CASES[case]
    out = tmp_path / "run"
    shutil.copytree(src, out)
    damage(str(out / "checkpoints" / "step_00000004" / rel))
    capsys.readouterr()
    rows = run(tiny(out, steps=6), resume=True, progress=False)
    said = capsys.readouterr().out
    fallback = [line for line in said.splitlines() if "falling back to step_00000002" in line]
    assert len(fallback) == 1 and message in fallback[0]
    assert "resuming from" in said and "step_00000002" in said
    # the older checkpoint continues the unbroken run exactly
    assert [r["step"] for r in rows] == [3, 4, 5, 6]
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight[2:]]
    # the rejected checkpoint is kept aside, the new ones are complete and verify
    names = sorted(os.listdir(out / "checkpoints"))
    assert names == ["rejected-step_00000004", "step_00000004", "step_00000006"]  # keep_last = 2
    for name in ("step_00000004", "step_00000006"):
        assert ckpt.verify(str(out / "checkpoints" / name)) is None


def test_every_checkpoint_corrupt_is_a_one_line_error(base, tmp_path, capsys):
    from train.__main__ import main

    out = tmp_path / "run"
    shutil.copytree(base[0], out)
    for step in (2, 4):
        flip(str(out / "checkpoints" / f"step_{step:08d}" / "state" / "__0_0.distcp"))
    args = ["--out-dir", str(out), "--training.seq_len=32", "--training.micro_batch=2", "--training.global_batch=2",
            "--resume"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("checkpoint error: --resume: no checkpoint in")
    assert "step_00000004: state/__0_0.distcp" in err[0] and "step_00000002: state/__0_0.distcp" in err[0]
    # nothing was moved or deleted
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000002", "step_00000004"]


def test_export_verifies(base, tmp_path, capsys):
    from train.export import main as export_main

    out = tmp_path / "run"
    shutil.copytree(base[0], out)
    truncate(str(out / "checkpoints" / "step_00000004" / "state" / ".metadata"))
    # the checkpoint itself: refused, naming the file
    assert export_main(["--checkpoint", str(out / "checkpoints" / "step_00000004"), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "state/.metadata has" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()
    # the run: the newest checkpoint that verifies, saying which one was skipped
    assert export_main(["--checkpoint", str(out), "--out", str(tmp_path / "b"), "--dtype", "float32"]) == 0
    captured = capsys.readouterr()
    assert "step_00000004: state/.metadata" in captured.err and "using step_00000002" in captured.err
    assert "step_00000002" in captured.out


def test_manifest_lists_every_file_with_its_hash(base):
    path = os.path.join(base[0], "checkpoints", "step_00000004")
    with open(os.path.join(path, ckpt.MANIFEST)) as f:
        files = json.load(f)["files"]
    on_disk = {os.path.relpath(os.path.join(d, n), path) for d, _, ns in os.walk(path) for n in ns}
    assert set(files) == on_disk - {ckpt.MANIFEST}
    for rel, entry in files.items():
        assert ckpt.file_digest(os.path.join(path, rel)) == entry


# ---------------------------------------------------------------------------- run ownership
def test_a_used_out_dir_needs_resume_or_overwrite(base, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base[0], out)
    with pytest.raises(ConfigError, match=r"is not empty \(checkpoints, config.json, metrics.jsonl\): continue its "
                                          r"run with --resume, start over with --overwrite"):
        run(tiny(out, steps=3), progress=False)
    with pytest.raises(ConfigError, match="--resume and --overwrite exclude each other"):
        run(tiny(out, steps=3), resume=True, overwrite=True, progress=False)
    (out / "notes.txt").write_text("mine")
    rows = run(tiny(out, steps=3), overwrite=True, progress=False)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the old run's step 4 is gone, this run's checkpoints survive pruning; other files stay
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000002", "step_00000003"]
    assert (out / "notes.txt").read_text() == "mine"
    resumed = run(tiny(out, steps=4), resume=True, progress=False)
    assert [r["step"] for r in resumed] == [4]


def test_pruning_keeps_only_this_runs_checkpoints(base, tmp_path):
    """A foreign checkpoint with a higher step (copied in by hand) is neither resumed over the
    run's own newest one by pruning, nor deleted."""
    out = tmp_path / "run"
    shutil.copytree(base[0], out)
    foreign = out / "checkpoints" / "step_00000009"
    shutil.copytree(out / "checkpoints" / "step_00000004", foreign)
    deleted = ckpt.prune(str(out / "checkpoints"), 4, "another-run", keep_last=1)
    assert deleted == [] and foreign.exists()
    with open(out / "checkpoints" / "step_00000004" / "meta.json") as f:
        run_id = json.load(f)["run_id"]
    deleted = ckpt.prune(str(out / "checkpoints"), 4, run_id, keep_last=1)
    assert [os.path.basename(p) for p in deleted] == ["step_00000002"]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000004", "step_00000009"]


def test_resume_without_checkpoint_says_so(tmp_path, capsys):
    rows = run(tiny(tmp_path / "fresh", steps=2), resume=True, progress=False)
    assert [r["step"] for r in rows] == [1, 2]
    out = capsys.readouterr().out.splitlines()
    assert sum("--resume: no checkpoint in" in line and "starting from step 0" in line for line in out) == 1


@pytest.mark.parametrize("flag,value,key", [
    ("--training.seed", "1", "training.seed was 0 there and is 1 now"),
    ("--training.seq_len", "16", "training.seq_len was 32 there and is 16 now"),
    ("--training.global_batch", "4", "training.global_batch was 2 there and is 4 now"),
    ("--data.val_fraction", "0.1", "data.val_fraction was 0.05 there and is 0.1 now"),
    ("--model.n_layers", "2", "model.n_layers was 4 there and is 2 now"),
    ("--model.vocab_size", "600", "model.vocab_size was 512 there and is 600 now"),
])
def test_resume_refuses_changed_keys(base, flag, value, key, capsys):
    from train.__main__ import main

    args = ["--out-dir", str(base[0]), "--steps", "5", "--training.seq_len=32", "--training.micro_batch=2",
            "--training.global_batch=2", "--resume", f"{flag}={value}"]
    before = sorted(os.listdir(os.path.join(base[0], "checkpoints")))
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and "cannot resume from" in err[0]
    assert sorted(os.listdir(os.path.join(base[0], "checkpoints"))) == before


def test_resume_refuses_another_data_blend(tmp_path):
    from train.trainer import check_resume_compatible, model_config

    cfg = tiny(tmp_path)
    cfg.data.paths, cfg.data.weights = ["a", "b"], [1.0, 1.0]
    meta = {"config": cfg.to_dict(), "model_config": {}}
    same = tiny(tmp_path)
    same.data.paths, same.data.weights = ["./a", "b"], [2.0, 2.0]  # the same blend, written otherwise
    check_resume_compatible(same, model_config(same), meta, "ckpt", "fp")
    other = tiny(tmp_path)
    other.data.paths, other.data.weights = ["a", "b"], [3.0, 1.0]
    with pytest.raises(ConfigError, match=r"data.weights was \[1.0, 1.0\] there and is \[3.0, 1.0\] now"):
        check_resume_compatible(other, model_config(other), meta, "ckpt", "fp")
    other.data.paths, other.data.weights = ["a", "c"], [1.0, 1.0]
    with pytest.raises(ConfigError, match=r"data.paths was \['a', 'b'\] there and is \['a', 'c'\] now"):
        check_resume_compatible(other, model_config(other), meta, "ckpt", "fp")


def test_resume_refuses_another_model_family_switch(tmp_path):
    """Every field of the model's config is part of the run, the family switches included."""
    import dataclasses
    import json

    from train.trainer import check_resume_compatible, model_config

    cfg = tiny(tmp_path)
    saved = json.loads(json.dumps(dataclasses.asdict(model_config(cfg))))  # as meta.json holds it
    meta = {"config": cfg.to_dict(), "model_config": saved}
    check_resume_compatible(cfg, model_config(cfg), meta, "ckpt", "fp")
    meta["model_config"] = dict(saved, qk_norm=not saved["qk_norm"])
    with pytest.raises(ConfigError, match=r"the model's qk_norm was (True|False) there"):
        check_resume_compatible(cfg, model_config(cfg), meta, "ckpt", "fp")


def test_resume_says_what_changed_and_when_there_is_nothing_to_do(base, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(base[0], out)
    cfg = tiny(out, steps=4)
    cfg.training.lr *= 0.5
    assert run(cfg, resume=True, progress=False) == []  # the newest checkpoint is at step 4
    said = capsys.readouterr().out.splitlines()
    changed = [line for line in said if line.startswith("--resume: settings changed")]
    assert changed == [f"--resume: settings changed since that checkpoint: training.lr {cfg.training.lr * 2!r} -> "
                       f"{cfg.training.lr!r}"]
    assert sum(line.startswith("--resume: nothing to train: the checkpoint is at step 4 and training.steps is 4")
               for line in said) == 1
