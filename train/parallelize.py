"""Parallelism and memory/speed wrappers, applied to the plain model from outside.

The model (model/llama.py) knows nothing of these. ``parallelize`` is the one entry: it builds
this rank's share of the model in the only order that works (see its docstring) from

- the DeviceMesh (pp, dp, tp) of ``make_layout`` and the pipeline stage cut by layer count;
- tensor and sequence parallelism with torch.distributed.tensor.parallel;
- weights that start from the same numbers as one process, whatever the layout (or an HF load);
- activation checkpointing and torch.compile of each block;
- FSDP2 (``fully_shard``) or plain replication over dp, with the bf16 policy.

The pipeline schedule is train/pipeline.py; the gradient norm and clipping train/grads.py.

Tensor parallelism follows Megatron's layout. wq/wk/wv/w1/w3 are column-parallel and wo/w2
row-parallel, so the attention and SwiGLU ops see plain local tensors holding n_heads / tp heads
(or ffn_dim / tp columns) and never gather anything. With sequence parallelism the residual
stream between blocks is the local (batch, seq / tp, dim) slice, and the norms run our RMSNorm op
on it as a Shard(1) DTensor through the op's registered sharding rule (meditron_kernels.
distributed); their weight is a Replicate DTensor whose gradient comes out Partial (each rank
saw only its slice of the sequence) and is summed over tp by FSDP or by settle_partial_grads. The
embedding is vocab-parallel and the head column-parallel over the vocabulary; the loss
(train/loss.py) runs the head and the cross-entropy as one vocabulary-parallel fused op, so no
rank ever holds logits, not even its own vocabulary slice's for a whole micro batch.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import torch
import torch.distributed as dist
from torch import nn

from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from .process_group import init_process_group

# ------------------------------------------------------------------------ activation checkpointing
# Selective recompute keeps what is expensive to redo (matmuls, attention) and recomputes the
# cheap elementwise and normalisation ops, whose outputs are as large as a matmul's.
_SAVE_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
             torch.ops.aten._scaled_dot_product_flash_attention.default,
             torch.ops.aten._scaled_dot_product_efficient_attention.default}


def _selective_policy(ctx, op, *args, **kwargs):
    if op in _SAVE_OPS or "attention" in str(op):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """none; full: recompute each block in the backward; selective: recompute norms, rotary and
    SwiGLU activations but keep matmul and attention outputs."""
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"activation checkpointing must be none, full or selective, got {mode!r}")
    for key, block in list(model.layers.items()):
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False,
                                         context_fn=functools.partial(create_selective_checkpoint_contexts,
                                                                      _selective_policy))
        model.layers[key] = wrapped


def apply_compile(model: torch.nn.Module) -> None:
    """torch.compile each transformer block (blocks share code, so they share compiled graphs)."""
    for key, block in list(model.layers.items()):
        model.layers[key] = torch.compile(block, fullgraph=True)


# ------------------------------------------------------------------------ layout
@dataclasses.dataclass
class Layout:
    """Where this process sits in the (pp, dp, tp) grid. Ranks are laid out tp-fastest, so a
    tensor-parallel group is a run of adjacent ranks (one node's NVLink domain)."""
    world: int = 1
    pp: int = 1
    dp: int = 1
    tp: int = 1
    pp_rank: int = 0
    dp_rank: int = 0
    tp_rank: int = 0
    sequence_parallel: bool = False
    mesh: object = None              # DeviceMesh with dims ("pp", "dp", "tp"), None single-process
    distributed: bool = False        # a process group is in use (also a 1-rank one for bf16 params)

    def group(self, dim: str):
        return self.mesh[dim].get_group() if self.mesh is not None else None

    def as_dict(self) -> dict:
        return dict(world=self.world, pp=self.pp, dp=self.dp, tp=self.tp)


def make_layout(parallel, dtype: str, device: torch.device) -> Layout:
    """Join (or create) the process group and build the mesh for ``parallel`` (the config's
    parallel section); ``dtype`` is training.dtype.

    Under torchrun (WORLD_SIZE set) this joins the job's group: NCCL on GPUs, gloo on the CPU.
    A single process gets a 1-rank group only when it needs one (bfloat16 parameters are FSDP's
    mixed-precision policy); otherwise it stays a plain process.
    """
    from torch.distributed.device_mesh import init_device_mesh

    p = parallel
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not (world > 1 or dtype == "bfloat16-params"):
        return Layout()
    init_process_group(device.type)
    world = dist.get_world_size()
    dp = world // (p.tp * p.pp)
    dims, names = [p.pp, dp, p.tp], ["pp", "dp", "tp"]
    if not p.fsdp:
        # Plain replication is FSDP2's hybrid mode with shards of one rank: parameters stay whole,
        # gradients are all-reduced over dp, and the bf16 policy works the same as with FSDP.
        dims.insert(2, 1)
        names.insert(2, "dp_shard")
    mesh = init_device_mesh(device.type, tuple(dims), mesh_dim_names=tuple(names))
    return Layout(world=world, pp=p.pp, dp=dp, tp=p.tp, pp_rank=mesh["pp"].get_local_rank(),
                  dp_rank=mesh["dp"].get_local_rank(), tp_rank=mesh["tp"].get_local_rank(),
                  sequence_parallel=p.sequence_parallel and p.tp > 1, mesh=mesh, distributed=True)


# ------------------------------------------------------------------------ pipeline stages
def stage_indices(pp_rank: int, pp: int, virtual: int, schedule: str) -> list[int]:
    """Pipeline stages held by pp rank ``pp_rank``: interleaved schedules loop over the ranks
    (r, r + pp, ...); the zero-bubble V schedule folds back (r, 2 pp - 1 - r)."""
    if schedule == "zbv":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(virtual)]


def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous layer ranges, one per stage, as even as possible; the earlier stages take the
    remainder, since the last stage also carries the head and the loss."""
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def build_stage(model_cfg, stage: int, n_stages: int):
    """The part of Llama that pipeline stage ``stage`` runs, on the meta device.

    Layers keep their global keys ("0".."L-1"), so parameter names, and with them checkpoints,
    are the same in every layout. The embedding lives on the first stage, the norm and head on
    the last."""
    from model import Llama

    with torch.device("meta"):
        m = Llama(model_cfg)
    keep = stage_layers(model_cfg.n_layers, n_stages)[stage]
    for key in list(m.layers.keys()):
        if int(key) not in keep:
            del m.layers[key]
    if stage != 0:
        m.tok_embeddings = None
    if stage != n_stages - 1:
        m.norm = None
        m.output = None
    return m


# ------------------------------------------------------------------------ tensor parallelism
def kv_layout(n_heads: int, n_kv_heads: int, tp: int) -> str:
    """How k/v heads meet tp: "split" (each rank a slice), "replicate" (fewer kv heads than ranks:
    every rank computes them all and keeps the one its query heads read), or "" (impossible)."""
    if tp == 1 or n_kv_heads % tp == 0:
        return "split"
    if tp % n_kv_heads == 0 and n_heads % tp == 0:
        return "replicate"
    return ""


def _norm_parallel(norm: nn.Module, tp_mesh, layout) -> None:
    """RMSNorm on DTensors: its weight a Replicate DTensor, every tensor input (x, and the
    residual of the fused add, positional or keyword) laid out as ``layout`` (Shard(1) under
    sequence parallelism, else Replicate), its outputs handed on as local tensors.

    The module's own forward runs unchanged; the op's sharding rule (meditron_kernels.
    distributed) makes the weight's gradient Partial under sequence parallelism (each rank
    saw its slice of the sequence), summed over tp by FSDP or by settle_partial_grads."""
    from torch.distributed.tensor import DTensor, distribute_module

    def as_dtensor(t):
        if isinstance(t, torch.Tensor) and not isinstance(t, DTensor):
            return DTensor.from_local(t, tp_mesh, (layout,), run_check=False)
        return t

    def inputs(module, args, kwargs):
        return tuple(as_dtensor(a) for a in args), {k: as_dtensor(v) for k, v in kwargs.items()}

    def outputs(module, args, kwargs, out):
        return tuple(o.to_local() for o in out) if isinstance(out, tuple) else out.to_local()

    distribute_module(norm, tp_mesh)
    norm.register_forward_pre_hook(inputs, with_kwargs=True)
    norm.register_forward_hook(outputs, with_kwargs=True)


def _replicated_kv(linear: nn.Linear, tp_mesh, lo: int, hi: int) -> None:
    """wk or wv when tp > n_kv_heads: the weight is replicated, every rank projects all kv heads
    and keeps columns [lo, hi) (the heads its query heads read). The kept slice's gradient
    flows back as Partial, so torch sums the weight gradient over the ranks sharing a head."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_module

    def input_fn(mod, inputs, mesh):
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, (Replicate(),), run_check=False)
        return (x,) + tuple(inputs[1:])

    def output_fn(mod, out, mesh):
        return out.to_local(grad_placements=(Partial(),))[..., lo:hi]

    distribute_module(linear, tp_mesh, input_fn=input_fn, output_fn=output_fn)


def apply_tp(model: nn.Module, tp_mesh, sequence_parallel: bool) -> None:
    """Megatron-style tensor (and sequence) parallelism of a Llama stage over ``tp_mesh``."""
    import meditron_kernels.distributed  # noqa: F401  (our ops' sharding rules, for the norms)
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   parallelize_module)

    tp = tp_mesh.size()
    cfg = model.cfg
    stream = Shard(1) if sequence_parallel else Replicate()  # residual-stream layout between blocks
    top = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)
    if model.output is not None:
        # The weight split over the vocabulary, which is all the fused loss reads; model(tokens)
        # still gives this rank's logits slice.
        top["output"] = ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1), use_local_output=True)
    if top:
        parallelize_module(model, tp_mesh, top)
    if model.norm is not None:
        _norm_parallel(model.norm, tp_mesh, stream)

    kv = kv_layout(cfg.n_heads, cfg.n_kv_heads, tp)
    tp_rank = tp_mesh.get_local_rank()
    for block in model.layers.values():
        plan = {
            "attention.wq": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=stream),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=stream),
        }
        if kv == "split":
            plan["attention.wk"] = ColwiseParallel()
            plan["attention.wv"] = ColwiseParallel()
        if sequence_parallel:
            # all-gather the normed slice before the column-parallel matmuls (x is the one
            # positional input of both; the rest are keywords, left alone)
            plan["attention"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
            plan["feed_forward"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        parallelize_module(block, tp_mesh, plan)
        if kv == "replicate":
            per_rank = cfg.n_heads // tp  # query heads per rank, all reading one kv head
            head = tp_rank * per_rank // (cfg.n_heads // cfg.n_kv_heads)
            hd = cfg.head_dim
            _replicated_kv(block.attention.wk, tp_mesh, head * hd, (head + 1) * hd)
            _replicated_kv(block.attention.wv, tp_mesh, head * hd, (head + 1) * hd)
        _norm_parallel(block.attention_norm, tp_mesh, stream)
        _norm_parallel(block.ffn_norm, tp_mesh, stream)


# ------------------------------------------------------------------------ initialisation
def _unit_seed(seed: int, unit: int) -> int:
    return (seed * 1_000_003 + unit * 7919 + 17) % (2**63 - 1)


@torch.no_grad()
def init_weights(parts: list[nn.Module], model_cfg, seed: int, device: torch.device) -> None:
    """Give every parameter the value it has in a one-process run, whatever the layout.

    Each unit (embedding, layer i, final norm, head: ``Llama.units``) is initialised whole by
    ``Llama.init_unit`` under its own seed, on a full model built on the meta device of which
    only that unit is ever allocated; then each rank copies in its slice. The result depends on
    the seed and the parameter alone, not on which rank or stage holds it.
    """
    from model import Llama

    with torch.device("meta"):
        full = Llama(model_cfg)
    order = {name: i for i, name in enumerate(full.units())}
    for part in parts:
        part.to_empty(device=device)
        part.init_rope()
        params = dict(part.named_parameters())
        for name in part.units():
            unit = full.get_submodule(name)
            unit.to_empty(device=device)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(_unit_seed(seed, order[name]))
                full.init_unit(name)
            for pname, value in unit.named_parameters(prefix=name):
                _copy_full(params[pname], value)
            unit.to_empty(device="meta")  # one unit in memory at a time


def _copy_full(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full (unsharded) value into parameter p, which may be a tensor-parallel DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        # every rank holds the full tensor: slice locally, no communication
        full = distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None).to_local()
        p = p.to_local()
    p.copy_(full)


@torch.no_grad()
def load_hf_weights(parts: list[nn.Module], path: str, device: torch.device) -> None:
    """Continued pretraining: fill this rank's parts from a Hugging Face Llama directory,
    reading only the tensors they hold (safetensors are memory-mapped, one tensor at a time)."""
    from model.hf import iter_hf_tensors

    for part in parts:
        part.to_empty(device=device)
        part.init_rope()
        params = dict(part.named_parameters())
        for name, full in iter_hf_tensors(path, {n: p.shape for n, p in params.items()}, strict=False):
            _copy_full(params[name], full.to(torch.float32))


# ------------------------------------------------------------------------ data parallelism
def mixed_precision_policy(dtype: str):
    """training.dtype = "bfloat16-params": parameters are all-gathered and computed in bf16,
    while FSDP keeps the float32 master copy the optimizer updates, and gradients are
    reduce-scattered (or all-reduced) in float32 so that summing over dp loses nothing."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if dtype == "bfloat16-params":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_data_parallel(part: nn.Module, layout: Layout, dtype: str, pipelined: bool) -> None:
    """FSDP2 over dp (each block, then the stage root), or, without parallel.fsdp, FSDP2's
    hybrid mode with one-rank shards, i.e. whole parameters and all-reduced gradients."""
    from torch.distributed.fsdp import fully_shard

    mesh = layout.mesh
    dp_mesh = mesh["dp"] if "dp_shard" not in mesh.mesh_dim_names else mesh["dp", "dp_shard"]
    mp = mixed_precision_policy(dtype)
    # Under pipelining a stage's blocks run once per micro batch, forward and backward far
    # apart: keeping them gathered after the forward avoids a second all-gather per micro batch.
    reshard = not pipelined
    for block in part.layers.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
    # The root's own parameters (embedding, norm, head) stay gathered from its forward to its
    # backward, as FSDP does for a root by default: the loss (train/loss.py) reads the head's
    # weight after the forward has returned the hidden states.
    fully_shard(part, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)


# ------------------------------------------------------------------------ the entry point
@dataclasses.dataclass
class ParallelModel:
    """This rank's share of the model: one module per pipeline stage it holds."""
    parts: list[nn.Module]
    stage_ids: list[int]             # the global stage index of each part
    n_stages: int
    data_parallel: bool              # wrapped in FSDP2 (sharded, or replicated with one-rank shards)
    replicated: bool                 # FSDP2's replicated mode: gradients all-reduced, not reduce-scattered

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.stage_ids

    @property
    def last(self) -> nn.Module:
        return self.parts[self.stage_ids.index(self.n_stages - 1)]


def parallelize(model_cfg, layout: Layout, device: torch.device, training, parallel,
                init_from_hf: str = "") -> ParallelModel:
    """Build this rank's stages of a Llama of shape ``model_cfg`` for ``layout``; ``training`` and
    ``parallel`` are the config's sections, ``init_from_hf`` an HF directory or ''.

    The order is forced: stages are cut on the meta device before anything is allocated; TP
    turns weights into DTensors, which initialisation then fills slice by slice; checkpointing
    and compile wrap blocks whose parameter names initialisation must still see unwrapped;
    FSDP comes last, sharding the DTensors and wrapping the compiled blocks."""
    if layout.pp > 1:
        per_rank = 2 if parallel.pp_schedule == "zbv" else parallel.virtual_stages
        n_stages = layout.pp * per_rank
        stage_ids = stage_indices(layout.pp_rank, layout.pp, per_rank, parallel.pp_schedule)
    else:
        n_stages, stage_ids = 1, [0]
    parts = [build_stage(model_cfg, s, n_stages) for s in stage_ids]
    if layout.tp > 1:
        for part in parts:
            apply_tp(part, layout.mesh["tp"], layout.sequence_parallel)
    if init_from_hf:
        load_hf_weights(parts, init_from_hf, device)
    else:
        init_weights(parts, model_cfg, training.seed, device)
    for part in parts:
        apply_activation_checkpointing(part, training.activation_checkpointing)
        if training.compile:
            apply_compile(part)
    # A data-parallel wrapper is needed for dp > 1, and for bf16 parameters (FSDP's policy
    # keeps the float32 masters) even on one rank.
    data_parallel = layout.distributed and (layout.dp > 1 or training.dtype == "bfloat16-params")
    if data_parallel:
        for part in parts:
            apply_data_parallel(part, layout, training.dtype, pipelined=layout.pp > 1)
    return ParallelModel(parts, stage_ids, n_stages, data_parallel, replicated=data_parallel and not parallel.fsdp)
