import dataclasses
import os

import pytest

from train.config import CONFIG_DIR, Config, ConfigError, apply_toml, parse_args, validate


def test_default_toml_mirrors_the_embedded_default():
    from_file = Config()
    apply_toml(from_file, os.path.join(CONFIG_DIR, "default.toml"))
    assert from_file == Config()


@pytest.mark.parametrize("name,dp", [("meditron-7b", 64), ("meditron-70b", 2)])
def test_meditron_presets_carry_the_published_recipe(name, dp):
    cfg, _ = parse_args(["--config", os.path.join(CONFIG_DIR, f"{name}.toml")])
    t = cfg.training
    assert cfg.model.preset == name
    assert (t.lr, t.min_lr, t.warmup_steps) == (1.5e-4, 1e-6, 2000)
    assert (t.beta1, t.beta2, t.eps, t.weight_decay, t.grad_clip) == (0.9, 0.95, 1e-5, 0.1, 1.0)
    assert (t.micro_batch, t.global_batch, t.seq_len) == (2, 512, 4096)
    assert t.dtype.startswith("bfloat16")
    world = dp * cfg.parallel.tp * cfg.parallel.pp
    validate(cfg, world_size=world)
    if name == "meditron-70b":
        assert (cfg.parallel.tp, cfg.parallel.pp) == (8, 8) and world == 128


def test_overrides_and_short_flags():
    cfg, flags = parse_args(["--steps", "7", "--out-dir=/tmp/x", "--resume", "--training.lr=3e-4",
                             "--data.weights=0.5,0.5", "--data.paths", "[\"a\", \"b\"]", "--training.compile=true",
                             "--init-from-hf", "/ckpt"])
    assert cfg.training.steps == 7 and cfg.out_dir == "/tmp/x" and flags["resume"]
    assert cfg.training.lr == 3e-4 and cfg.data.weights == [0.5, 0.5] and cfg.data.paths == ["a", "b"]
    assert cfg.training.compile is True and cfg.model.init_from_hf == "/ckpt"


@pytest.mark.parametrize("argv,match", [
    (["--training.stepz=3"], "unknown config key 'training.stepz'"),
    (["--trainin.steps=3"], "unknown config section 'trainin'"),
    (["--training.steps=three"], "training.steps: expected int"),
    (["--training.compile=maybe"], "training.compile: expected bool"),
    (["--training.lr=fast"], "training.lr: expected float"),
    (["positional"], "unexpected argument"),
    (["--steps"], "--steps needs a value"),
    (["--config", "/nonexistent.toml"], "does not exist"),
])
def test_bad_arguments_name_the_key(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(argv)


def test_toml_type_errors_name_the_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[training]\nsteps = \"ten\"\n")
    with pytest.raises(ConfigError, match="training.steps: expected int, got 'ten'"):
        parse_args(["--config", str(path)])
    path.write_text("[training]\nsteps = 10.5\n")
    with pytest.raises(ConfigError, match="training.steps"):
        parse_args(["--config", str(path)])
    path.write_text("[nope]\nx = 1\n")
    with pytest.raises(ConfigError, match="unknown config section 'nope'"):
        parse_args(["--config", str(path)])
    path.write_text("[training\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_args(["--config", str(path)])


def test_a_section_key_at_the_top_level_names_its_section(tmp_path):
    path = tmp_path / "flat.toml"
    path.write_text("steps = 3\n")
    with pytest.raises(ConfigError, match=r"top-level key 'steps' belongs under \[training\]"):
        parse_args(["--config", str(path)])
    with pytest.raises(ConfigError, match=r"unknown config key 'lr'; did you mean --training.lr\?"):
        parse_args(["--lr=0.1"])


def test_inconsistent_values_are_rejected():
    def bad(match, world=1, **changes):
        cfg = Config()
        for key, value in changes.items():
            section, name = key.split("__")
            setattr(getattr(cfg, section), name, value)
        with pytest.raises(ConfigError, match=match):
            validate(cfg, world_size=world)

    bad(r"training.global_batch \(10\) must be divisible by training.micro_batch x dp \(4 x 1 = 4\)",
        training__global_batch=10, training__micro_batch=4)
    bad(r"training.micro_batch x dp \(4 x 2 = 8\)", world=2, training__global_batch=12, training__micro_batch=4)
    bad("world size 6 is not divisible by parallel.tp x parallel.pp", world=6, parallel__tp=4)
    bad("model.preset", model__preset="llama3")
    bad("training.dtype", training__dtype="fp8")
    bad("data.weights has 1 entries but data.paths has 2", data__paths=["a", "b"], data__weights=[1.0])
    bad("checkpoint.keep_last", checkpoint__keep_last=0)
    bad("parallel.pp_schedule", parallel__pp_schedule="zero-bubble")


def test_help_lists_every_key(capsys):
    from train.__main__ import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for section in ("model", "training", "data", "eval", "checkpoint", "metrics", "parallel"):
        for f in dataclasses.fields(getattr(Config(), section)):
            assert f"--{section}.{f.name}=" in out


@pytest.mark.parametrize("key,value,match", [
    ("training.lr", float("inf"), "training.lr must be finite, got inf"),
    ("training.lr", float("nan"), "training.lr must be finite, got nan"),
    ("training.lr", 0.0, "training.lr must be > 0, got 0.0"),
    ("training.min_lr", float("nan"), "training.min_lr must be finite"),
    ("training.beta1", 1.5, r"training.beta1 must be in \[0, 1\), got 1.5"),
    ("training.beta2", 1.0, r"training.beta2 must be in \[0, 1\), got 1.0"),
    ("training.beta1", -0.1, r"training.beta1 must be in \[0, 1\)"),
    ("training.eps", 0.0, "training.eps must be > 0"),
    ("training.weight_decay", -0.1, "training.weight_decay must be >= 0, got -0.1"),
    ("training.grad_clip", -1.0, "training.grad_clip must be >= 0"),
    ("training.warmup_steps", -1, "training.warmup_steps must be >= 0"),
    ("training.seed", -1, "training.seed must be >= 0"),
    ("training.max_skipped_steps", 0, "training.max_skipped_steps must be >= 1"),
    ("eval.batches", 0, "eval.batches must be >= 1, got 0"),
    ("eval.interval", -1, r"eval.interval must be >= 0 \(0 = never\), got -1"),
    ("checkpoint.interval", -5, r"checkpoint.interval must be >= 0 \(0 = only at the end\), got -5"),
    ("metrics.log_interval", -1, "metrics.log_interval must be >= 1, got -1"),
    ("metrics.log_interval", 0, "metrics.log_interval must be >= 1, got 0"),
    ("metrics.peak_tflops", float("inf"), "metrics.peak_tflops must be finite"),
    ("data.val_fraction", float("nan"), "data.val_fraction must be finite"),
    ("data.weights", [1.0, float("inf")], "data.weights must be finite"),
    ("model.dim", -64, r"model.dim must be positive, or 0 for the preset's value, got -64"),
    ("model.norm_eps", float("nan"), "model.norm_eps must be finite"),
    ("training.seq_len", 0, "training.seq_len must be a positive number of tokens, got 0"),
])
def test_every_key_is_range_checked(key, value, match):
    cfg = Config()
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


@pytest.mark.parametrize("argv,match", [
    (["--training.lr=inf"], "training.lr must be finite"),
    (["--training.lr=nan"], "training.lr must be finite"),
    (["--training.beta1=1.5"], r"training.beta1 must be in \[0, 1\)"),
    (["--eval.batches=0"], "eval.batches must be >= 1"),
    (["--checkpoint.interval=-1"], "checkpoint.interval must be >= 0"),
    (["--model.dim=64", "--model.init_from_hf=/some/hf"], "model.dim cannot be combined with model.init_from_hf"),
])
def test_command_line_values_are_validated(argv, match):
    cfg, _ = parse_args(argv)
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


def test_resume_and_overwrite_flags():
    _, flags = parse_args(["--overwrite"])
    assert flags["overwrite"] and not flags["resume"]
    with pytest.raises(ConfigError, match="--overwrite takes no value"):
        parse_args(["--overwrite=yes"])


@pytest.mark.parametrize("argv,match", [
    (["--model.n_heads=3"], r"the preset's dim \(128\) must be divisible by model.n_heads \(3\)"),
    (["--model.n_kv_heads=3"], r"the preset's n_heads \(4\) must be divisible by model.n_kv_heads \(3\)"),
    (["--model.dim=96", "--model.n_heads=32"], r"head size model.dim \(96\) / model.n_heads \(32\) = 3 must be even"),
])
def test_model_overrides_are_validated(argv, match):
    from train.trainer import model_config

    cfg, _ = parse_args(argv)
    validate(cfg)
    with pytest.raises(ConfigError, match=match):
        model_config(cfg)


def test_model_overrides_apply_on_top_of_the_preset():
    from train.trainer import check_model_fits, model_config

    cfg, _ = parse_args(["--model.vocab_size=2000", "--model.n_layers=2", "--model.ffn_dim=256"])
    validate(cfg)
    m = model_config(cfg)
    assert (m.vocab_size, m.n_layers, m.ffn_dim, m.dim, m.n_heads, m.n_kv_heads) == (2000, 2, 256, 128, 4, 2)
    check_model_fits(cfg, m, 2000)
    with pytest.raises(ConfigError, match=r"data.tokenizer has 2000 tokens but the model's vocab_size is 512 "
                                          r"\(set --model.vocab_size=2000 or more\)"):
        check_model_fits(Config(), model_config(Config()), 2000)


# ------------------------------------------------------------- user errors from the command line
def _main_error(argv, capsys) -> str:
    """python -m train's main in-process: exit code 2 and exactly one line on stderr."""
    from train.__main__ import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_startup_errors_are_one_line(tmp_path, capsys, monkeypatch):
    out = ["--out-dir", str(tmp_path / "run")]
    line = _main_error(out + ["--data.tokenizer=/no/such/tokenizer.json"], capsys)
    assert line.startswith("config error: data.tokenizer") and "/no/such/tokenizer.json" in line
    line = _main_error(out + ["--model.backend=cuda"], capsys)
    assert line.startswith("config error: model.backend = 'cuda' needs")
    line = _main_error(out + ["--training.seq_len=100000"], capsys)
    assert line.startswith("config error: training.seq_len = 100000") and "fewer than one sequence" in line
    (tmp_path / "file").write_text("x")
    line = _main_error(["--out-dir", str(tmp_path / "file"), "--steps", "1"], capsys)
    assert "out_dir" in line and "not a directory" in line
    line = _main_error(["--out-dir", str(tmp_path / "file" / "run"), "--steps", "1"], capsys)
    assert line.startswith("config error: out_dir") and "file" in line

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    line = _main_error(out + ["--metrics.tensorboard=true"], capsys)
    assert line == "config error: metrics.tensorboard = true needs the tensorboard package (pip install tensorboard)"
    assert not (tmp_path / "run").exists()  # nothing was written for a refused run


def test_triton_backend_on_the_cpu_without_the_interpreter_is_one_line(tmp_path, capsys, monkeypatch):
    # the kernels would refuse CPU tensors at the first step, after config.json was written
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = ["--out-dir", str(tmp_path / "run"), "--training.device=cpu"]
    line = _main_error(out + ["--model.backend=triton"], capsys)
    assert line.startswith("config error: model.backend = 'triton' on cpu needs the Triton interpreter")
    assert "TRITON_INTERPRET=1" in line
    assert not (tmp_path / "run").exists()  # so the same command, fixed, is not refused as "not empty"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_out_dir(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = _main_error(["--out-dir", str(locked / "run")], capsys)
        assert line.startswith("config error: out_dir") and "not writable" in line
    finally:
        locked.chmod(0o700)
