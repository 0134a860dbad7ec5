"""Tile configurations: the tables of candidates per (kernel, architecture, head_dim, rotary), the
decoding configuration, whether a call can take TMA and warp specialization, the autotuner that
picks among the candidates on a GPU, and overrides(), through which tests and benchmarks pin those
choices."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator, Mapping

import torch
import triton
from triton.runtime.errors import OutOfResources

from .problem import Problem
from .tiles import _d_pad

MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile shape and launch options of one kernel. block_m: query rows; block_n: key rows."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    warp_spec: bool = False


# Every tile shape lives here: {(kernel, arch, head_dim class, rotary): [default, other candidates]}.
# The autotuner (on a GPU) times the candidates; the default runs everywhere else, and is what the
# static report compiles. Every 16-bit default compiles without spills for sm_80 and sm_90.
# Reasoning, bf16/fp16 at d = 128: a 128-row query tile makes each k/v tile fetched from L2 feed
# 128 x 128 x 4 flops per pair of elements; its fp32 accumulators (o, and the scores) take 8 warps
# to stay in registers. On Hopper, wgmma reads k and v straight from shared memory, and 3 stages of
# 64 KB k+v tiles plus the 32 KB q tile fit in 227 KB. Ampere's mma.sync pulls operands through
# registers, so its tiles are half as wide. The dk/dv program holds two fp32 key-block accumulators,
# which caps it at 128 keys x 32 queries per step on sm_90 (64 keys on sm_80). Rotary tiles carry the
# fp32 cos/sin tiles of every key block too, so they use half the key rows.
_C = Config
_TABLE = {
    ("fwd", 90, 64, False): [_C(128, 128, 8, 3), _C(128, 64, 4, 3), _C(128, 128, 8, 4), _C(64, 64, 4, 3)],
    ("fwd", 90, 128, False): [_C(128, 128, 8, 3), _C(128, 128, 8, 2), _C(128, 64, 8, 3), _C(64, 64, 4, 3)],
    ("fwd", 90, 256, False): [_C(128, 64, 8, 2), _C(64, 64, 4, 2), _C(64, 32, 4, 3)],
    ("fwd", 80, 64, False): [_C(128, 64, 8, 2), _C(64, 64, 4, 2), _C(128, 64, 4, 2)],
    ("fwd", 80, 128, False): [_C(128, 64, 8, 2), _C(128, 32, 8, 3), _C(64, 64, 4, 2)],
    ("fwd", 80, 256, False): [_C(64, 32, 8, 2), _C(32, 32, 4, 2), _C(64, 64, 8, 2)],
    ("dq", 90, 64, False): [_C(128, 64, 8, 3), _C(128, 128, 8, 2), _C(64, 64, 4, 3)],
    ("dq", 90, 128, False): [_C(128, 64, 8, 3), _C(128, 32, 8, 3), _C(64, 64, 4, 3)],
    ("dq", 90, 256, False): [_C(64, 32, 4, 2), _C(64, 64, 8, 2), _C(32, 32, 4, 2)],
    ("dq", 80, 64, False): [_C(128, 64, 8, 2), _C(64, 64, 4, 3), _C(128, 32, 4, 3)],
    ("dq", 80, 128, False): [_C(128, 32, 8, 2), _C(64, 32, 4, 2), _C(128, 32, 8, 3)],
    ("dq", 80, 256, False): [_C(64, 32, 8, 2), _C(32, 32, 4, 2), _C(64, 16, 4, 2)],
    ("dkdv", 90, 64, False): [_C(32, 128, 8, 3), _C(64, 128, 8, 3), _C(64, 64, 4, 3)],
    # 16 queries, 2 stages: Triton 3.6 (the GPU machines') spills 96 bytes at 32 x 128 x 3 stages and 24 at
    # 16 x 128 x 3 once the kernel rotates its own key tile; 3.9 spills at neither.
    ("dkdv", 90, 128, False): [_C(16, 128, 8, 2), _C(16, 128, 8, 3), _C(32, 128, 8, 3), _C(32, 128, 8, 2)],
    ("dkdv", 90, 256, False): [_C(32, 32, 8, 2), _C(32, 64, 8, 2), _C(16, 64, 8, 2)],
    ("dkdv", 80, 64, False): [_C(32, 128, 8, 2), _C(32, 64, 4, 2), _C(64, 64, 4, 2)],
    ("dkdv", 80, 128, False): [_C(32, 64, 8, 2), _C(16, 128, 8, 2), _C(32, 64, 4, 1)],
    ("dkdv", 80, 256, False): [_C(32, 32, 8, 2), _C(16, 64, 8, 2), _C(16, 32, 4, 2)],
    ("fwd", 90, 64, True): [_C(128, 64, 8, 3), _C(128, 128, 8, 2), _C(64, 64, 4, 3)],
    ("fwd", 90, 128, True): [_C(128, 64, 8, 2), _C(128, 64, 8, 3), _C(128, 128, 8, 2)],
    ("fwd", 90, 256, True): [_C(64, 32, 8, 2), _C(64, 64, 8, 2)],
    ("fwd", 80, 64, True): [_C(64, 32, 4, 2), _C(128, 32, 8, 2)],
    ("fwd", 80, 128, True): [_C(64, 32, 4, 2), _C(64, 16, 4, 2)],
    ("fwd", 80, 256, True): [_C(32, 32, 4, 2), _C(64, 16, 4, 2)],
    ("dq", 90, 64, True): [_C(128, 64, 8, 2), _C(128, 32, 8, 3)],
    ("dq", 90, 128, True): [_C(128, 32, 8, 3), _C(128, 64, 8, 2)],
    ("dq", 90, 256, True): [_C(32, 32, 8, 2), _C(16, 16, 4, 2)],
    ("dq", 80, 64, True): [_C(64, 32, 4, 2), _C(32, 32, 4, 2)],
    ("dq", 80, 128, True): [_C(32, 32, 4, 2), _C(64, 16, 4, 2)],
    ("dq", 80, 256, True): [_C(32, 16, 8, 2), _C(16, 16, 4, 2)],
    ("dkdv", 90, 64, True): [_C(32, 128, 8, 3), _C(32, 64, 4, 3)],
    ("dkdv", 90, 128, True): [_C(32, 128, 8, 3), _C(16, 128, 8, 3)],
    ("dkdv", 90, 256, True): [_C(32, 32, 8, 2), _C(16, 16, 4, 2)],
    ("dkdv", 80, 64, True): [_C(32, 64, 8, 2), _C(32, 32, 4, 2)],
    ("dkdv", 80, 128, True): [_C(32, 32, 4, 2), _C(16, 64, 8, 2)],
    ("dkdv", 80, 256, True): [_C(16, 32, 8, 2), _C(16, 16, 4, 2)],
}
# Warp-specialized candidates (sm_90, TMA, no rotary; docs/attention.md): tried by the autotuner beside
# the table above, never a default until a GPU measurement picks them. Triton splits a program into a
# TMA producer warp group and two consumer warp groups that each own half of the rows (num_warps=4
# becomes 12 warps; at 8 Triton does not specialize), so block_m / block_n = 128 gives each consumer
# the 64-row wgmma tile of FlashAttention-3.
_TABLE_WS = {
    ("fwd", 90, 64, False): [_C(128, 128, 4, 3, True), _C(128, 128, 4, 2, True)],
    ("fwd", 90, 128, False): [_C(128, 128, 4, 2, True), _C(128, 64, 4, 3, True)],
    ("dq", 90, 64, False): [_C(128, 64, 4, 3, True), _C(128, 128, 4, 2, True)],
    ("dq", 90, 128, False): [_C(128, 64, 4, 2, True), _C(128, 64, 4, 3, True)],
    ("dkdv", 90, 64, False): [_C(64, 128, 4, 3, True), _C(32, 128, 4, 3, True)],
    ("dkdv", 90, 128, False): [_C(64, 128, 4, 2, True), _C(32, 128, 4, 3, True)],
}
# Head dims that are not a power of two load through masked pointers rather than TMA; where that
# costs registers, they get their own entry.
_TABLE_PADDED = {
    ("dkdv", 90, 128, False): [_C(16, 128, 8, 3)],
    ("dkdv", 90, 128, True): [_C(16, 128, 8, 3)],
}
# fp32 inputs run the "ieee" dot, on CUDA cores: a correctness path, in small tiles (one config).
# Its dq kernel keeps q, do and dq whole per thread and spills under 1 KB even so.
_TABLE_F32 = {
    ("fwd", 128): _C(32, 16, 4, 1), ("fwd", 256): _C(16, 16, 4, 1),
    ("dq", 128): _C(16, 16, 4, 1), ("dq", 256): _C(16, 16, 8, 1),
    ("dkdv", 128): _C(16, 32, 4, 1), ("dkdv", 256): _C(16, 16, 4, 1),
}

# Under the interpreter every program runs in Python: small tiles, with block_m != block_n so that
# the causal diagonal spans several key blocks and a sequence of 37 spans several of each. The same
# tiles warp-specialized are its candidates beside them, which only a test forces (overrides): the
# interpreter ignores the specialization but runs everything else of those kernels.
_INTERPRETER = {"fwd": Config(32, 16, 4, 1), "dq": Config(32, 16, 4, 1), "dkdv": Config(16, 32, 4, 1)}
_INTERPRETER_WS = {kernel: dataclasses.replace(c, warp_spec=True) for kernel, c in _INTERPRETER.items()}


def candidates(kernel: str, cc: int | None, dtype: torch.dtype, head_dim: int, rotary: bool = False,
               warp_spec: bool = False) -> list[Config]:
    """The configurations of ``kernel`` ("fwd", "dq" or "dkdv"); the first is the default.
    cc None: the interpreter. warp_spec: the call can take warp-specialized configurations
    (see warp_spec_ok); without it they are left out."""
    if cc is None:
        return [_INTERPRETER[kernel]] + ([_INTERPRETER_WS[kernel]] if warp_spec else [])
    width = _d_pad(head_dim)
    if dtype == torch.float32:
        return [_TABLE_F32[(kernel, 128 if width <= 128 else 256)]]
    key = (kernel, 90 if cc >= 90 else 80, min(max(width, 64), 256), rotary)
    if head_dim != width and key in _TABLE_PADDED:
        return _TABLE_PADDED[key]
    # (only Hopper: Blackwell's warp specialization is another compiler pass, never compiled here)
    warp_spec = warp_spec and cc == 90
    return [c for c in _TABLE[key] + _TABLE_WS.get(key, []) if warp_spec or not c.warp_spec]


def default_config(kernel: str, cc: int | None, dtype: torch.dtype, head_dim: int, rotary: bool = False) -> Config:
    """The deterministic configuration: what runs without autotuning and what the static report compiles."""
    return candidates(kernel, cc, dtype, head_dim, rotary)[0]


# Decoding: a few query rows (group * sq <= DECODE_MAX_ROWS) against a long cache is bound by reading
# the cache once. One program per (sequence, kv head) holds every query row of the group, so a
# 16-row tile, padded where the group is smaller, feeds the matmuls. When those programs would not
# fill the GPU (fewer than its SMs), the keys are split among more programs (flash-decoding), each at
# least DECODE_MIN_SPLIT keys so that its partial result (d fp32 per row) stays small next to the
# keys it reads, up to two programs per SM; a small kernel merges the splits by their log-sum-exps.
# Key tiles: 64 rows of 128-wide bf16 k and v are 32 KB per stage, so three stages fit either part;
# the fp32 accumulator is at most 64 x 128 over 4 warps.
DECODE_MAX_ROWS = 64
DECODE_MIN_SPLIT = 256
_DECODE = {64: _C(16, 128, 4, 3), 128: _C(16, 64, 4, 3), 256: _C(16, 32, 4, 2)}
_DECODE_F32 = {64: _C(16, 32, 4, 2), 128: _C(16, 32, 4, 2), 256: _C(16, 16, 4, 1)}
# Under the interpreter: small key tiles and splits, and a pretend GPU of 4 SMs, so that tests cross
# both paths.
_INTERPRETER_DECODE = (Config(16, 16, 4, 1), 16, 4)  # (config, least keys per split, SMs)


def decode_config(cc: int | None, dtype: torch.dtype, head_dim: int) -> Config:
    """The decoding kernel's key tile (block_n) and launch options (block_m is the least row tile)."""
    if cc is None:
        return _INTERPRETER_DECODE[0]
    width = min(max(_d_pad(head_dim), 64), 256)
    return (_DECODE_F32 if dtype == torch.float32 else _DECODE)[width]


def decode_splits(n_programs: int, seqlen_k: int, n_sm: int, min_split: int = DECODE_MIN_SPLIT) -> int:
    """Key splits per (sequence, kv head): enough programs for two per SM, each with >= min_split keys."""
    if n_programs >= n_sm:
        return 1
    return max(1, min(triton.cdiv(2 * n_sm, n_programs), triton.cdiv(seqlen_k, min_split), 128))


# ---------------------------------------------------------------------------- overrides (tests, benchmarks)
@dataclasses.dataclass(frozen=True, eq=False)  # (each is its own: overrides() removes it by identity)
class Overrides:
    """What a test or a benchmark changes in the choices below (see :func:`overrides`)."""
    interpret_tma: bool = False  # under the interpreter, the TMA descriptor path where sm_90 would take it
    configs: Mapping[str, Config] = dataclasses.field(default_factory=dict)  # {kernel: the candidate to run}
    splits: int | None = None  # decoding: this many key splits


NO_OVERRIDES = Overrides()
# Process-wide, not per thread or context: autograd runs a CUDA backward on a thread of its own, which
# must see the overrides of the code that called it.
_overrides: list[Overrides] = [NO_OVERRIDES]


@contextlib.contextmanager
def overrides(*, interpret_tma: bool = False, configs: Mapping[str, Config] | None = None,
              splits: int | None = None) -> Iterator[Overrides]:
    """The testing hook: attention calls made inside run with these choices. interpret_tma: load tiles
    through tensor descriptors under the interpreter too (which enforces TMA's alignment rules).
    configs {"fwd" | "dq" | "dkdv": Config}: run that candidate instead of tuning, where the call can
    take it (a warp-specialized one needs TMA; elsewhere the usual choice runs). splits: the decoding
    kernel's number of key splits. The op reads them once per call (:func:`current_overrides`) and
    hands them on as arguments."""
    ov = Overrides(interpret_tma, dict(configs or {}), splits)
    _overrides.append(ov)
    try:
        yield ov
    finally:
        _overrides.remove(ov)


def current_overrides() -> Overrides:
    return _overrides[-1]


# ---------------------------------------------------------------------------- what a call can take
def use_tma(cc: int | None, head_dim: int, rotary: bool, *tensors: torch.Tensor,
            interpret_tma: bool = False) -> bool:
    """TMA descriptors on sm_90 when every (document, head) slab satisfies TMA's rules: 16-byte
    aligned base and row stride, unit stride along d; and d a power of two (with rotary, whose
    tiles are half as wide, at least 32) so that a tile is exactly a box. cc None (the interpreter):
    only with ``interpret_tma``."""
    if cc is None:
        if not interpret_tma:
            return False
    elif cc < 90 or tensors[0].dtype == torch.float32:  # fp32 runs on CUDA cores: nothing to feed
        return False
    if head_dim != _d_pad(head_dim) or (rotary and head_dim < 32):
        return False
    for t in tensors:
        es = t.element_size()
        if t.data_ptr() % 16 or t.stride(-1) != 1 or any((st * es) % 16 for st in t.stride()[:-1]):
            return False
        if t.stride(-3) == 0:  # the row stride of a descriptor cannot be 0 (broadcast tokens)
            return False
    return True


def warp_spec_ok(tma: bool, rotary: bool, *all_heads: torch.Tensor, var_k: bool = False) -> bool:
    """Whether a call can take the warp-specialized configurations: every tile through TMA (rotary
    tables come through pointers), and for ``all_heads`` (q and do of the dk/dv kernel, read through one
    descriptor spanning a token's heads) the heads of a token side by side. Keys counted per sequence
    (var_k, a KV cache) stay on the default kernels: that variant was never compiled specialized, and a
    failing compile would abort the autotuner."""
    return tma and not rotary and not var_k and all(t.stride(-2) == t.shape[-1] for t in all_heads)


def _autotune_enabled(x: torch.Tensor) -> bool:
    return (x.is_cuda and os.environ.get("MEDITRON_KERNELS_AUTOTUNE", "1") != "0"
            and not torch.cuda.is_current_stream_capturing())


# ---------------------------------------------------------------------------- autotuning
_CHOSEN: dict[tuple, Config] = {}


def run_tuned(kernel: str, cc: int | None, x: torch.Tensor, head_dim: int, rotary: bool, key: tuple, run,
              warp_spec: bool = False, force: Config | None = None) -> None:
    """run(config) with this call's configuration: on a GPU, the fastest candidate for ``key`` (head_dim
    and the sequence-length bucket among it), timed once per process; else the default. A candidate
    the part cannot hold (shared memory differs a little between Triton versions) yields to the next.
    force: that candidate instead, when it is one of this call's."""
    cands = candidates(kernel, cc, x.dtype, head_dim, rotary, warp_spec)
    if force is not None:
        cands = [c for c in cands if c == force] or cands
    key = (kernel, cc, x.dtype, head_dim, rotary, warp_spec, force) + key
    cfg = _CHOSEN.get(key)
    if cfg is None:
        if len(cands) > 1 and _autotune_enabled(x):
            timed = []
            for c in cands:
                try:
                    timed.append((triton.testing.do_bench(lambda: run(c), warmup=5, rep=25), cands.index(c)))
                except OutOfResources:
                    continue
            cands = [cands[i] for _, i in sorted(timed)] or cands
        for c in cands:
            try:
                run(c)
            except OutOfResources:
                if c is cands[-1]:
                    raise
                continue
            _CHOSEN[key] = c
            return
    run(cfg)


def tune_key(P: Problem, tma: bool) -> tuple:
    """What a tuned choice is kept for, beside the kernel, part, dtype and head_dim: the call's kind and
    its sequence lengths' power-of-two buckets."""
    window = ((P.window_left, P.window_right),) if P.windowed else ()  # a band is other work than the square
    return (P.causal, P.packed, tma, triton.next_power_of_2(max(P.seqlen_q, 1)),
            triton.next_power_of_2(max(P.seqlen_k, 1))) + window


def is_decode(P: Problem) -> bool:
    # Rotary calls take the general kernel: the model's cache holds keys already rotated.
    return not P.rotary and P.group * P.seqlen_q <= DECODE_MAX_ROWS
