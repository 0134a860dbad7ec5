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
