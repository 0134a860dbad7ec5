"""Training configuration: dataclass sections, TOML files and ``--section.key=value`` overrides.

Precedence: the dataclass defaults (the embedded default, mirrored by configs/default.toml),
then ``--config FILE``, then command-line overrides. Unknown keys, wrong types and
inconsistent batch sizes are rejected with a message naming the key.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def opt(default, help: str):
    """A config field with its documentation (shown by ``python -m train --help``)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelSection:
    preset: str = opt("tiny", "model preset: llama2-7b, llama2-13b, llama2-70b, meditron-7b, meditron-70b or tiny")
    backend: str = opt("auto", "kernel backend for every op: auto, torch, triton or cuda")
    init_from_hf: str = opt("", "start from this Hugging Face Llama directory (continued pretraining); '' = random init")
    # Shape overrides on top of the preset; 0 keeps the preset's value.
    vocab_size: int = opt(0, "vocabulary size; 0 = the preset's (must cover data.tokenizer)")
    dim: int = opt(0, "hidden size; 0 = the preset's")
    n_layers: int = opt(0, "transformer blocks; 0 = the preset's")
    n_heads: int = opt(0, "attention heads (dim / n_heads must be even); 0 = the preset's")
    n_kv_heads: int = opt(0, "key/value heads (GQA; must divide n_heads); 0 = the preset's")
    ffn_dim: int = opt(0, "SwiGLU hidden size; 0 = the preset's")
    norm_eps: float = opt(0.0, "RMSNorm epsilon; 0 = the preset's")
    rope_theta: float = opt(0.0, "rotary base; 0 = the preset's")


@dataclass
class TrainingSection:
    steps: int = opt(150, "optimizer steps to run in total")
    micro_batch: int = opt(8, "sequences per micro batch per data-parallel rank")
    global_batch: int = opt(8, "sequences per optimizer step, over all ranks and accumulation steps")
    seq_len: int = opt(256, "tokens per sequence")
    lr: float = opt(2e-3, "peak learning rate, reached after warmup_steps")
    min_lr: float = opt(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = opt(15, "linear warmup steps from 0 to lr")
    decay_steps: int = opt(0, "steps of cosine decay after warmup; 0 = until training.steps")
    weight_decay: float = opt(0.1, "AdamW weight decay (not applied to norms and embeddings)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    eps: float = opt(1e-5, "AdamW epsilon")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this; 0 = no clipping")
    seed: int = opt(0, "seed for initialisation, data order and dropout-free RNG state")
    dtype: str = opt("float32", "float32, or bfloat16 (autocast with float32 master weights), or bfloat16-params")
    device: str = opt("auto", "auto (cuda if available), cpu or cuda")
    activation_checkpointing: str = opt("none", "none, full (every block), or selective (attention and MLP activation)")
    compile: bool = opt(False, "torch.compile each transformer block")
    nan_policy: str = opt("skip", "on a non-finite loss or gradient norm: skip (skip the step and count it) or stop")
    max_skipped_steps: int = opt(20, "stop when this many steps have been skipped in a row")


@dataclass
class DataSection:
    paths: list[str] = opt([], "prepared shard directories (python -m train.prepare); [] = the bundled corpus")
    weights: list[float] = opt([], "blend weight per path (normalised); [] = equal weights, or the bundled mix")
    tokenizer: str = opt("byte", "byte, or a path to a sentencepiece .model or an HF tokenizer.json")
    pack: bool = opt(True, "pack documents and pass their boundaries to attention (no cross-document attention)")
    val_fraction: float = opt(0.05, "fraction of each corpus's documents held out for validation")
    verify: str = opt("full", "shard check at start-up: full (checksum) or size (sizes and index only)")


@dataclass
class EvalSection:
    interval: int = opt(50, "validate every this many steps (and at the end), whatever metrics.log_interval; 0 = never")
    batches: int = opt(4, "validation micro batches per evaluation")


@dataclass
class CheckpointSection:
    interval: int = opt(50, "save every this many steps (and at the end); 0 = only at the end")
    keep_last: int = opt(2, "complete checkpoints to keep")


@dataclass
class MetricsSection:
    log_interval: int = opt(10, "log every this many steps")
    peak_tflops: float = opt(0.0, "peak dense TFLOP/s per device for MFU; 0 = from the device table (null on CPU)")
    tensorboard: bool = opt(False, "also write TensorBoard events (needs the tensorboard package)")


@dataclass
class ParallelSection:
    tp: int = opt(1, "tensor-parallel degree (heads and MLP split across ranks)")
    pp: int = opt(1, "pipeline-parallel stages")
    pp_schedule: str = opt("1f1b", "pipeline schedule: 1f1b, interleaved-1f1b, zbv or gpipe")
    virtual_stages: int = opt(1, "pipeline stages per rank (interleaved schedules)")
    fsdp: bool = opt(True, "shard parameters, gradients and optimizer state over data-parallel ranks (FSDP2)")
    sequence_parallel: bool = opt(True, "shard norms and residuals over the sequence inside a TP group")


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    data: DataSection = field(default_factory=DataSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    out_dir: str = opt("runs/default", "output directory: metrics.jsonl, checkpoints/")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


CHOICES = {
    "model.backend": ("auto", "torch", "triton", "cuda"),
    "training.dtype": ("float32", "bfloat16", "bfloat16-params"),
    "training.device": ("auto", "cpu", "cuda"),
    "training.activation_checkpointing": ("none", "full", "selective"),
    "training.nan_policy": ("skip", "stop"),
    "data.verify": ("full", "size"),
    "parallel.pp_schedule": ("1f1b", "interleaved-1f1b", "zbv", "gpipe"),
}


def _sections(cfg: Config) -> dict[str, object]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(f.type) or
            dataclasses.is_dataclass(getattr(cfg, f.name))}


def _coerce(key: str, value, typ):
    """value (from TOML, or a string from the command line) as typ, or a ConfigError naming key."""
    origin = typing.get_origin(typ)
    from_cli = isinstance(value, str) and typ is not str
    try:
        if origin is list:
            (inner,) = typing.get_args(typ)
            if isinstance(value, str):
                text = value.strip()
                if text.startswith("["):
                    value = tomllib.loads(f"v = {text}")["v"]
                else:
                    value = [v.strip() for v in text.split(",") if v.strip()]
            if not isinstance(value, list):
                raise TypeError
            return [_coerce(key, v, inner) for v in value]
        if typ is bool:
            if isinstance(value, bool):
                return value
            if from_cli and value.lower() in ("true", "1", "yes", "on"):
                return True
            if from_cli and value.lower() in ("false", "0", "no", "off"):
                return False
            raise TypeError
        if typ is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, int):
                return value
            if from_cli:
                return int(value)
            raise TypeError
        if typ is float:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, (int, float)):
                return float(value)
            if from_cli:
                return float(value)
            raise TypeError
        if typ is str:
            if isinstance(value, str):
                return value
            raise TypeError
    except (TypeError, ValueError):
        pass
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"{key}: expected {name}, got {value!r}")


def _section_of(cfg: Config, name: str) -> str | None:
    """The section that has a key called ``name``, if one does."""
    for section_name, section in _sections(cfg).items():
        if name in typing.get_type_hints(type(section)):
            return section_name
    return None


def _set(cfg: Config, key: str, value) -> None:
    parts = key.split(".")
    if len(parts) == 1:
        top = {f.name: f for f in dataclasses.fields(Config) if not dataclasses.is_dataclass(getattr(cfg, f.name))}
        if key not in top:
            home = _section_of(cfg, key)
            raise ConfigError(f"unknown config key {key!r}" + (f"; did you mean --{home}.{key}?" if home else ""))
        hints = typing.get_type_hints(Config)
        setattr(cfg, key, _coerce(key, value, hints[key]))
        return
    if len(parts) != 2:
        raise ConfigError(f"unknown config key {key!r}: keys look like section.key")
    section_name, name = parts
    sections = _sections(cfg)
    if section_name not in sections:
        raise ConfigError(f"unknown config section {section_name!r} in {key!r}; sections: {sorted(sections)}")
    section = sections[section_name]
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        raise ConfigError(f"unknown config key {key!r}; {section_name} has {sorted(hints)}")
    setattr(section, name, _coerce(key, value, hints[name]))


def apply_toml(cfg: Config, path: str) -> None:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path!r} is not valid TOML: {e}") from None
    for k, v in data.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                _set(cfg, f"{k}.{kk}", vv)
        elif _section_of(cfg, k) and not hasattr(cfg, k):
            raise ConfigError(f"config file {path!r}: top-level key {k!r} belongs under [{_section_of(cfg, k)}]")
        else:
            _set(cfg, k, v)


MODEL_SHAPE_KEYS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "norm_eps", "rope_theta")

# the lowest allowed value of each numeric key, and how to say it
_RANGES = {
    "training.steps": (1, "a positive number of steps"),
    "training.micro_batch": (1, "a positive batch size"),
    "training.global_batch": (1, "a positive batch size"),
    "training.seq_len": (1, "a positive number of tokens"),
    "training.warmup_steps": (0, ">= 0"),
    "training.decay_steps": (0, ">= 0 (0 = until training.steps)"),
    "training.weight_decay": (0, ">= 0"),
    "training.grad_clip": (0, ">= 0 (0 = no clipping)"),
    "training.seed": (0, ">= 0"),
    "training.max_skipped_steps": (1, ">= 1"),
    "training.min_lr": (0, ">= 0"),
    "eval.interval": (0, ">= 0 (0 = never)"),
    "eval.batches": (1, ">= 1"),
    "checkpoint.interval": (0, ">= 0 (0 = only at the end)"),
    "checkpoint.keep_last": (1, ">= 1"),
    "metrics.log_interval": (1, ">= 1"),
    "metrics.peak_tflops": (0, ">= 0 (0 = from the device table)"),
    "parallel.tp": (1, "a positive degree"),
    "parallel.pp": (1, "a positive number of stages"),
    "parallel.virtual_stages": (1, "a positive number of stages per rank"),
}


def _fields(cfg: Config):
    """(key, value) of every config field, 'section.name' keys."""
    for sname, section in _sections(cfg).items():
        for f in dataclasses.fields(section):
            yield f"{sname}.{f.name}", getattr(section, f.name)


def validate(cfg: Config, world_size: int = 1) -> None:
    """Every key's range, and consistency checks across keys; each error names the keys involved."""
    from model import PRESETS

    for key, value in _fields(cfg):  # NaN and infinity fit no key
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"{key} must be finite, got {value!r}")
    for key, (low, meaning) in _RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value < low:
            raise ConfigError(f"{key} must be {meaning}, got {value!r}")
    for name in MODEL_SHAPE_KEYS:
        value = getattr(cfg.model, name)
        if value < 0:
            raise ConfigError(f"model.{name} must be positive, or 0 for the preset's value, got {value!r}")
        if value and cfg.model.init_from_hf:
            raise ConfigError(f"model.{name} cannot be combined with model.init_from_hf: the shape comes from "
                              f"{cfg.model.init_from_hf}/config.json")
    t = cfg.training
    if not t.lr > 0:
        raise ConfigError(f"training.lr must be > 0, got {t.lr!r}")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(t, key) < 1:
            raise ConfigError(f"training.{key} must be in [0, 1), got {getattr(t, key)!r}")
    if not t.eps > 0:
        raise ConfigError(f"training.eps must be > 0, got {t.eps!r}")
    if not cfg.out_dir:
        raise ConfigError("out_dir must not be empty")

    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")
    if cfg.model.preset not in PRESETS:
        raise ConfigError(f"model.preset must be one of {sorted(PRESETS)}, got {cfg.model.preset!r}")
    p = cfg.parallel
    if world_size % (p.tp * p.pp):
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tp x parallel.pp = "
                          f"{p.tp} x {p.pp} = {p.tp * p.pp}")
    dp = world_size // (p.tp * p.pp)
    if t.global_batch % (t.micro_batch * dp):
        raise ConfigError(f"training.global_batch ({t.global_batch}) must be divisible by training.micro_batch x dp "
                          f"({t.micro_batch} x {dp} = {t.micro_batch * dp})")
    if t.min_lr > t.lr:  # each >= 0 and lr > 0 is checked above
        raise ConfigError(f"need training.min_lr <= training.lr, got lr={t.lr}, min_lr={t.min_lr}")
    d = cfg.data
    if d.weights and len(d.weights) != len(d.paths):
        raise ConfigError(f"data.weights has {len(d.weights)} entries but data.paths has {len(d.paths)}")
    if any(w < 0 for w in d.weights) or (d.weights and sum(d.weights) <= 0):
        raise ConfigError(f"data.weights must be non-negative with a positive sum, got {d.weights}")
    if not 0 <= d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")


def validate_parallel(cfg: Config, world_size: int, model_cfg) -> None:
    """Checks of the parallel layout against the model's shape (a LlamaConfig), before any
    process group or weight exists; each error names the values involved."""
    p, t = cfg.parallel, cfg.training
    tp, pp, v = p.tp, p.pp, p.virtual_stages
    m = model_cfg
    if m.n_heads % tp:
        raise ConfigError(f"the model's n_heads ({m.n_heads}) is not divisible by parallel.tp ({tp})")
    if tp > 1 and m.n_kv_heads % tp and tp % m.n_kv_heads:
        raise ConfigError(f"the model's n_kv_heads ({m.n_kv_heads}) and parallel.tp ({tp}): one must divide "
                          "the other (kv heads are split across tp ranks, or replicated when tp > n_kv_heads)")
    for name in ("ffn_dim", "vocab_size"):
        if getattr(m, name) % tp:
            raise ConfigError(f"the model's {name} ({getattr(m, name)}) is not divisible by parallel.tp ({tp})")
    if tp > 1 and p.sequence_parallel and t.seq_len % tp:
        raise ConfigError(f"training.seq_len ({t.seq_len}) is not divisible by parallel.tp ({tp}), "
                          "as parallel.sequence_parallel needs")
    if tp > 1 and t.compile:
        raise ConfigError(f"training.compile with parallel.tp = {tp} is not supported: the compiled blocks' backward "
                          "hands plain tensors to DTensor's redistribution (torch 2.13, CPU); compile with "
                          "pipeline or data parallelism only")
    if pp == 1 and v > 1:
        raise ConfigError(f"parallel.virtual_stages ({v}) > 1 needs pipeline parallelism (parallel.pp > 1)")
    if pp > 1:
        s = p.pp_schedule
        if s in ("1f1b", "gpipe") and v != 1:
            raise ConfigError(f"parallel.pp_schedule = {s!r} runs one stage per rank; parallel.virtual_stages "
                              f"must be 1, got {v} (use 'interleaved-1f1b' or 'zbv')")
        if s == "interleaved-1f1b" and v < 2:
            raise ConfigError("parallel.pp_schedule = 'interleaved-1f1b' needs parallel.virtual_stages >= 2, "
                              f"got {v}")
        if s == "zbv" and v != 2:
            raise ConfigError(f"parallel.pp_schedule = 'zbv' runs exactly 2 stages per rank: set "
                              f"parallel.virtual_stages = 2, got {v}")
        if s == "zbv" and t.compile:
            raise ConfigError("parallel.pp_schedule = 'zbv' does not work with training.compile "
                              "(its split backward runs outside torch.compile)")
    stages = pp * v
    if m.n_layers < stages:
        raise ConfigError(f"the model has {m.n_layers} layers, fewer than the pipeline stages parallel.pp x "
                          f"parallel.virtual_stages = {pp} x {v} = {stages}")
    if pp > 1 and world_size % (tp * pp) == 0:
        dp = world_size // (tp * pp)
        if t.global_batch % (t.micro_batch * dp) == 0:
            n_micro = t.global_batch // (t.micro_batch * dp)
            if n_micro < pp:
                raise ConfigError(f"training.global_batch / (training.micro_batch x dp) = {t.global_batch} / "
                                  f"({t.micro_batch} x {dp}) = {n_micro} micro batches per step, fewer than "
                                  f"parallel.pp ({pp}): the pipeline needs at least one per stage")
            if p.pp_schedule in ("interleaved-1f1b", "zbv") and n_micro % pp:
                raise ConfigError(f"parallel.pp_schedule = {p.pp_schedule!r} needs the micro batches per step "
                                  f"({n_micro} = training.global_batch / (training.micro_batch x dp)) to be a "
                                  f"multiple of parallel.pp ({pp})")


def parse_args(argv: list[str]) -> tuple[Config, dict]:
    """-> (config, flags) where flags holds resume, overwrite and config given on the command line.

    Accepts --config FILE, --out-dir DIR, --steps N, --resume, --overwrite, --init-from-hf PATH
    and --section.key=value (or --section.key value)."""
    cfg = Config()
    flags = {"resume": False, "overwrite": False, "config": None}
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --section.key=value")
        name, eq, value = arg[2:].partition("=")
        if name in ("resume", "overwrite"):
            if eq:
                raise ConfigError(f"--{name} takes no value")
            flags[name] = True
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{name} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        aliases = {"out-dir": "out_dir", "steps": "training.steps", "init-from-hf": "model.init_from_hf"}
        if name == "config":
            flags["config"] = value
        else:
            overrides.append((aliases.get(name, name), value))
    config_path = flags["config"] or os.path.join(CONFIG_DIR, "default.toml")
    apply_toml(cfg, config_path)
    for key, value in overrides:
        _set(cfg, key, value)
    return cfg, flags


def help_text() -> str:
    lines = ["usage: python -m train [--config FILE] [--out-dir DIR] [--steps N] [--resume | --overwrite]",
             "                       [--init-from-hf PATH] [--section.key=value ...]", "",
             "  --resume     continue the run in --out-dir from its newest checkpoint that verifies",
             "               (starts from step 0, saying so, when there is none)",
             "  --overwrite  start over in a used --out-dir: deletes its checkpoints/, metrics.jsonl,",
             "               config.json and tensorboard/ (without it a used --out-dir is refused)",
             "  SIGTERM or Ctrl-C saves a checkpoint after the current step and exits with 128 + signal",
             "  (143 or 130); --resume continues exactly.", "", "config keys (default):"]
    cfg = Config()
    for sname, section in _sections(cfg).items():
        for f in dataclasses.fields(section):
            lines.append(f"  --{sname}.{f.name}={getattr(section, f.name)!r}")
            lines.append(f"      {f.metadata.get('help', '')}")
    lines.append(f"  --out_dir={cfg.out_dir!r}")
    return "\n".join(lines)
