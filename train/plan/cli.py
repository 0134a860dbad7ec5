"""The command line: `python -m train.plan` (see the package docstring and docs/plan.md)."""
from __future__ import annotations

import argparse
import json

from .hardware import GPUS, GiB
from .layout import OVERLAP, RECOMPUTE
from .step import Prediction, predict, search
from .runs import validation_table
from .shapes import ARCHITECTURES, Architecture, get_architecture

DESCRIPTION = "Cluster cost model for training Llama-2-family transformers with tensor, pipeline and data parallelism."

# The trainer's training.activation_checkpointing, in the planner's terms (layout.RECOMPUTE).
TRAINER_RECOMPUTE = {"none": "none", "full": "full", "selective": "elementwise"}


def config_defaults(path: str) -> dict:
    """The planner's flags that a training TOML (train/configs/*.toml) determines, read through
    train.config: the model preset, batch sizes, sequence length, tp, pp, virtual stages,
    sequence parallelism, FSDP2 or replication over dp, and activation checkpointing."""
    from train.config import Config, ConfigError, apply_toml

    cfg = Config()
    try:
        apply_toml(cfg, path)
    except ConfigError as e:
        raise ValueError(f"--config: {e}") from None
    t, p = cfg.training, cfg.parallel
    if t.activation_checkpointing not in TRAINER_RECOMPUTE:
        raise ValueError(f"--config: training.activation_checkpointing must be one of {sorted(TRAINER_RECOMPUTE)}, "
                         f"got {t.activation_checkpointing!r}")
    return dict(model=cfg.model.preset, micro_batch=t.micro_batch, global_batch=t.global_batch, seq_len=t.seq_len,
                tp=p.tp, pp=p.pp, virtual_stages=p.virtual_stages, no_sequence_parallel=not p.sequence_parallel,
                fsdp=p.fsdp, no_distributed_optimizer=not p.fsdp,
                recompute=TRAINER_RECOMPUTE[t.activation_checkpointing])


def report(pred: Prediction) -> str:
    L, m = pred.layout, pred.memory
    gb = lambda x: f"{x / GiB:7.2f} GiB"  # noqa: E731
    verdict = "fits" if pred.fits else (f"DOES NOT FIT: needs {pred.memory_gb_per_gpu:.1f} GiB per GPU, "
                                        f"the {pred.gpu} has {pred.capacity_bytes / GiB:.1f} GiB")
    lines = [
        f"{pred.model} on {pred.nodes} x {pred.gpus_per_node} {pred.gpu}: TP {L.tp}, PP {L.pp}"
        + (f" x {L.virtual_stages} chunks" if L.virtual_stages > 1 else "")
        + f", DP {L.dp}; micro-batch {L.micro_batch}, global batch {L.global_batch}, seq {L.seq_len}, "
          f"recompute {L.recompute}",
        "",
        f"memory per GPU (most loaded stage): {pred.memory_gb_per_gpu:.2f} GiB of "
        f"{pred.capacity_bytes / GiB:.1f} GiB: {verdict}",
        f"  parameters  {gb(m.parameters)}   " + ("(fp32 shards + gathered bf16)" if L.fsdp else "(bf16)"),
        f"  gradients   {gb(m.gradients)}   ({'fp32' if L.grad_bytes == 4 else 'bf16'})",
        f"  optimizer   {gb(m.optimizer)}   (fp32 master + Adam m, v"
        + (f"; sharded over DP {L.dp}{' with weights and gradients, FSDP' if L.fsdp else ''})"
           if L.optimizer_sharded and L.dp > 1 else ")"),
        f"  activations {gb(m.activations)}",
        f"  overhead    {gb(m.overhead)}   (context, NCCL, workspaces, fragmentation)",
        "",
        f"pipeline: {pred.n_microbatches} micro-batches, bubble (p-1)/(v m) = {pred.bubble_fraction:.1%} "
        f"= {pred.bubble_s:.3f} s",
        "step time breakdown (s):",
        f"  compute             {pred.compute_s:9.3f}",
        f"  TP comm exposed     {pred.tp_comm_exposed_s:9.3f}   (all {pred.tp_comm_s:.3f}; "
        f"with backward overlap {pred.tp_comm_exposed_overlap_s:.3f})",
        f"  PP send/recv        {pred.pp_comm_s:9.3f}",
        f"  pipeline bubble     {pred.bubble_s:9.3f}",
        f"  DP comm exposed     {pred.dp_comm_exposed_s:9.3f}   (all {pred.dp_comm_s:.3f}; "
        f"overlapped with backward {pred.dp_comm_exposed_overlap_s:.3f})",
        f"  optimizer step      {pred.optimizer_s:9.3f}",
        f"  step (overlap {L.overlap}) {pred.step_time_s:9.3f}   (no overlap {pred.step_time_no_overlap_s:.3f}; "
        f"TP + DP overlap {pred.step_time_overlap_s:.3f})",
        "",
        f"tokens/s {pred.tokens_per_s:,.0f} ({pred.tokens_per_s_per_gpu:,.0f} per GPU)",
        f"MFU {pred.mfu:.1%} (6 N_total per token), {pred.mfu_named:.1%} (6 N_non_embedding + 12 L d s)",
    ]
    return "\n".join(lines)


def parse_model(text: str) -> Architecture:
    """A preset name, a JSON object, or a path to a JSON file."""
    if text in ARCHITECTURES:
        return ARCHITECTURES[text]
    if text.lstrip().startswith("{"):
        try:
            return Architecture.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"--model is not valid JSON: {e}") from None
    if text.endswith(".json"):
        try:
            with open(text) as f:
                return Architecture.from_dict(json.load(f), name=text)
        except OSError as e:
            raise ValueError(f"--model file {text!r} cannot be read: {e}") from None
    return get_architecture(text)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m train.plan", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Presets: " + ", ".join(ARCHITECTURES) + ". --model also takes a JSON object or file "
               "with dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab_size.")
    ap.add_argument("--config", help="a training TOML (train/configs/*.toml): the model, batch, sequence and "
                                     "parallel layout the trainer would run; flags given too override it")
    ap.add_argument("--model", help="preset name, JSON object or .json file")
    ap.add_argument("--gpu", choices=sorted(GPUS))
    ap.add_argument("--nodes", type=int)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dp", type=int, default=None, help="default: the GPUs left over by tp x pp")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--global-batch", type=int, default=512, help="sequences per step (default 512)")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the model's max_seq_len")
    ap.add_argument("--recompute", choices=RECOMPUTE, default=None,
                    help="selective: Megatron's attention-core recomputation; elementwise: the trainer's selective "
                         "(norms, rotary, SwiGLU); full: every layer. Default selective; --search tries none, "
                         "selective and full unless given")
    ap.add_argument("--virtual-stages", type=int, default=1, help="interleaved 1F1B model chunks per rank")
    ap.add_argument("--no-sequence-parallel", action="store_true")
    ap.add_argument("--no-distributed-optimizer", action="store_true",
                    help="do not shard the fp32 master weights and Adam moments over DP (ZeRO-1)")
    ap.add_argument("--fsdp", action="store_true",
                    help="FSDP2 over DP as the trainer applies it: weights, gradients and optimizer state sharded")
    ap.add_argument("--no-flash-attention", action="store_true")
    ap.add_argument("--eager-kernels", action="store_true", help="norms/rotary/SwiGLU as eager op chains")
    ap.add_argument("--grad-dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--overlap", choices=OVERLAP, default="tp")
    ap.add_argument("--json", action="store_true", help="print the prediction (or search results) as JSON")
    ap.add_argument("--search", action="store_true", help="list the best layouts for this cluster and model")
    ap.add_argument("--top", type=int, default=10, help="layouts --search prints")
    ap.add_argument("--validate", action="store_true", help="predict the published runs against their figures")
    ap.add_argument("--markdown", action="store_true", help="with --validate: a markdown table")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.config:
        try:
            ap.set_defaults(**config_defaults(args.config))
        except ValueError as e:
            ap.error(str(e))
        args = ap.parse_args(argv)  # flags given on the command line override the file
    if args.validate:
        print(validation_table(markdown=args.markdown))
        return 0
    missing = [f"--{n}" for n in ("model", "gpu", "nodes") if getattr(args, n) is None]
    if missing:
        ap.error(f"the following arguments are required: {', '.join(missing)}")
    features = dict(virtual_stages=args.virtual_stages, sequence_parallel=not args.no_sequence_parallel,
                    distributed_optimizer=not args.no_distributed_optimizer, fsdp=args.fsdp,
                    flash_attention=not args.no_flash_attention, fused_kernels=not args.eager_kernels,
                    grad_bytes=4 if args.grad_dtype == "fp32" else 2, overlap=args.overlap)
    try:
        arch = parse_model(args.model)
        if args.search:
            results = search(arch, args.gpu, args.nodes, args.gpus_per_node, global_batch=args.global_batch,
                             seq_len=args.seq_len, recompute=args.recompute, **features)
        else:
            pred = predict(arch, args.gpu, args.nodes, args.gpus_per_node, tp=args.tp, pp=args.pp, dp=args.dp,
                           micro_batch=args.micro_batch, global_batch=args.global_batch, seq_len=args.seq_len,
                           recompute=args.recompute or "selective", **features)
    except ValueError as e:
        ap.error(str(e))

    if not args.search:
        print(json.dumps(pred.to_dict(), indent=2) if args.json else report(pred))
        return 0
    shown = results[: args.top]
    if args.json:
        print(json.dumps([r.to_dict() for r in shown], indent=2))
        return 0
    world = args.nodes * args.gpus_per_node
    if not shown:
        print(f"no layout of {arch.name} fits on {world} x {args.gpu} with global batch {args.global_batch}")
        return 1
    print(f"best layouts for {arch.name} on {args.nodes} x {args.gpus_per_node} {args.gpu}, "
          f"global batch {args.global_batch} ({len(results)} fit):")
    print(f"{'tp':>3} {'pp':>3} {'dp':>4} {'mb':>3} {'recompute':>9} {'tokens/s':>11} {'MFU':>6} "
          f"{'MFU named':>9} {'step s':>8} {'bubble':>7} {'GiB/GPU':>8}")
    for r in shown:
        L = r.layout
        print(f"{L.tp:>3} {L.pp:>3} {L.dp:>4} {L.micro_batch:>3} {L.recompute:>9} {r.tokens_per_s:>11,.0f} "
              f"{r.mfu:>6.1%} {r.mfu_named:>9.1%} {r.step_time_s:>8.2f} {r.bubble_fraction:>7.1%} "
              f"{r.memory_gb_per_gpu:>8.1f}")
    return 0
