"""RMSNorm, optionally fused with the pre-norm residual add, as Triton kernels.

    y = x * rsqrt(mean(x^2) + eps) * weight                       rms_norm(x, w)
    h = x + residual;  y = rms_norm(h, w);  returns (y, h)        rms_norm(x, w, residual=r)

Statistics are float32 whatever the input dtype. In the fused case h is rounded to x.dtype
once and y normalises the rounded h, exactly as the reference and an unfused pair of ops do,
so the backward can work from the saved h alone.

Bytes per row of hidden N in a 16-bit dtype (the floor the kernels are built to reach):
    forward          read x (and residual), write y (and h)     4N (8N fused)
    backward         read h, dy (and dh), write dx              6N (8N fused)
plus, once per backward, the dweight partials: programs x N x 4 bytes written and read again,
about 1-2% of the traffic at 16k rows.

rstd is recomputed in the backward, not saved. Saving it would add 4 bytes per row written by
the forward and 4 read by the backward, and keep an extra (rows,) tensor alive from forward to
backward; recomputing moves no bytes at all, because the backward has the row of h in
registers anyway (it needs it for dx and dweight), so rstd costs one more FMA per element and
one more row reduction, both hidden under the memory time. Rows too long for registers
(N > 8192) take a statistics pass that reads h and dy once; it computes rstd and the dx
correction term together, so saving rstd would not remove that pass either.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .. import _validate as V
from ..backend import register
from ._common import Launch, as_rows, cast_rtne, soft_bf16

# The supported hidden sizes: tested up to here. Nothing in the streaming paths breaks above it,
# but nothing above it is validated, so it is refused rather than silently trusted.
MAX_HIDDEN = 65536


# ---------------------------------------------------------------------------- kernels
@triton.jit
def _load_h(x_ptrs, r_ptrs, h_ptrs, mask, HAS_RESIDUAL: tl.constexpr, SOFT_BF16: tl.constexpr):
    """The float32 tile of the normalised input: x, or h = x + residual rounded to x's dtype (then
    stored to H), exactly as an unfused add would produce it."""
    # Loads are cast to float32 before any arithmetic: that is the statistics precision, and the
    # only correct form for bfloat16 under the Triton interpreter.
    h = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
        h_out = cast_rtne(h + r, h_ptrs.dtype.element_ty, SOFT_BF16)
        tl.store(h_ptrs, h_out, mask=mask)
        h = h_out.to(tl.float32)
    return h


@triton.jit
def _rms_norm_fwd_kernel(
    X,  # (rows, N) input; unit column stride
    R,  # (rows, N) residual, read only when HAS_RESIDUAL
    W,  # (N,) weight, x.dtype or float32
    Y,  # (rows, N) output, contiguous
    H,  # (rows, N) x + residual, contiguous, written only when HAS_RESIDUAL
    stride_x,  # elements between rows of X
    stride_r,  # elements between rows of R
    n_rows,  # number of rows
    N,  # hidden size
    eps,  # added to mean(x^2) before the rsqrt
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # columns per tile
    WHOLE_ROW: tl.constexpr,  # BLOCK_N >= N: the row is held in registers, read once
    HAS_RESIDUAL: tl.constexpr,  # fused pre-norm add
    SOFT_BF16: tl.constexpr,  # bfloat16 output under the interpreter: see _common.cast_rtne
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)
    x_rows = X + rows[:, None] * stride_x
    r_rows = R + rows[:, None] * stride_r
    y_rows = Y + rows[:, None] * N
    h_rows = H + rows[:, None] * N
    if WHOLE_ROW:
        cols = tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols < N)[None, :]
        h = _load_h(x_rows + cols[None, :], r_rows + cols[None, :], h_rows + cols[None, :], mask, HAS_RESIDUAL,
                    SOFT_BF16)
        rstd = tl.math.rsqrt(tl.sum(h * h, axis=1) / N + eps)
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
        y = h * rstd[:, None] * w[None, :]
        tl.store(y_rows + cols[None, :], cast_rtne(y, Y.dtype.element_ty, SOFT_BF16), mask=mask)
    else:
        # Rows longer than a register tile: accumulate sum(h^2) chunk by chunk, then stream the
        # row again (h from H, which this same thread just wrote, or x), mostly out of L2.
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols < N)[None, :]
            h = _load_h(x_rows + cols[None, :], r_rows + cols[None, :], h_rows + cols[None, :], mask, HAS_RESIDUAL,
                        SOFT_BF16)
            acc += h * h
        rstd = tl.math.rsqrt(tl.sum(acc, axis=1) / N + eps)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols < N)[None, :]
            if HAS_RESIDUAL:
                h = tl.load(h_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                h = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
            y = h * rstd[:, None] * w[None, :]
            tl.store(y_rows + cols[None, :], cast_rtne(y, Y.dtype.element_ty, SOFT_BF16), mask=mask)


@triton.jit
def _rms_norm_bwd_stats_kernel(
    DY,  # (rows, N) gradient of y; unit column stride
    X,  # (rows, N) the normalised input: x, or h in the fused case; unit column stride
    W,  # (N,) weight
    STATS,  # (rows, 2) float32 out: rstd, and c = mean(xhat * w * dy)
    stride_dy,  # elements between rows of DY
    stride_x,  # elements between rows of X
    N,  # hidden size
    eps,  # as in the forward
    BLOCK_N: tl.constexpr,  # columns per chunk
):
    # Only for rows too long for the backward's register tile: one program per row.
    row = tl.program_id(0).to(tl.int64)
    acc_xx = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_xg = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        acc_xx += x * x
        acc_xg += x * (w * dy)
    rstd = tl.math.rsqrt(tl.sum(acc_xx, axis=0) / N + eps)
    c = tl.sum(acc_xg, axis=0) * rstd / N  # mean(xhat * w * dy), xhat = x * rstd
    tl.store(STATS + row * 2, rstd)
    tl.store(STATS + row * 2 + 1, c)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,  # (rows, N) gradient of y; unit column stride
    X,  # (rows, N) the normalised input: x, or h in the fused case; unit column stride
    DH,  # (rows, N) gradient arriving at h from downstream, read only when HAS_DH
    W,  # (N,) weight
    STATS,  # (rows, 2) float32 rstd and c from the stats kernel, read only when not WHOLE_ROW
    DX,  # (rows, N) out, contiguous: gradient of x (and of the residual: both are dh)
    DW_PARTIAL,  # (programs along rows, N) float32 out: this program's sum of dy * xhat
    stride_dy,  # elements between rows of DY
    stride_x,  # elements between rows of X
    stride_dh,  # elements between rows of DH
    n_rows,  # number of rows
    N,  # hidden size
    eps,  # as in the forward
    rows_per_program,  # a multiple of BLOCK_M: program i owns rows [i * rows_per_program, ...)
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per program
    WHOLE_ROW: tl.constexpr,  # BLOCK_N >= N: the row statistics are computed here, in registers
    HAS_DH: tl.constexpr,  # fused case: add the gradient that reached h directly
    COMPUTE_DW: tl.constexpr,  # whether weight needs a gradient
    NUM_STAGES: tl.constexpr,  # row tiles in flight in the software pipeline
    SOFT_BF16: tl.constexpr,  # bfloat16 output under the interpreter: see _common.cast_rtne
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    # Each program owns a fixed, contiguous range of rows and sums its dweight share in
    # registers; the host adds the partials in a fixed order: deterministic, no atomics.
    dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_begin = pid_m * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, n_rows)
    # Software-pipelined: the loads of the next NUM_STAGES - 1 row tiles are in flight (cp.async
    # into shared memory) while this tile is reduced, which is what keeps the one or two
    # programs that fit on an SM streaming at full bandwidth across the reductions' barriers.
    for i in tl.range(0, tl.cdiv(row_end - row_begin, BLOCK_M), num_stages=NUM_STAGES):
        rows = row_begin + i * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        rows = rows.to(tl.int64)
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        wdy = w[None, :] * dy
        if WHOLE_ROW:
            rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / N + eps)
            xhat = x * rstd[:, None]
            c = tl.sum(xhat * wdy, axis=1) / N
        else:
            rstd = tl.load(STATS + rows * 2, mask=row_ok, other=0.0)
            c = tl.load(STATS + rows * 2 + 1, mask=row_ok, other=0.0)
            xhat = x * rstd[:, None]
        # d/dx of x * rstd(x) * w, contracted with dy: rstd * (w dy - xhat * mean(xhat w dy))
        dx = (wdy - xhat * c[:, None]) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * N + cols[None, :], cast_rtne(dx, DX.dtype.element_ty, SOFT_BF16), mask=mask)
        if COMPUTE_DW:
            dw += dy * xhat
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid_m.to(tl.int64) * N + cols, tl.sum(dw, axis=0), mask=col_ok)


# ---------------------------------------------------------------------------- configuration
class Config(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int = 1


# Longest rows a program holds whole in registers. The forward keeps h and w (two float32
# values per element); the backward keeps x, dy, w, dweight and dh (five), so its limit is
# half: at 8192 with 16 warps that is 16 elements of each per thread, about 110 registers.
ROW_TILE_FWD = 16384
ROW_TILE_BWD = 8192
STREAM_CHUNK = 4096  # column chunk of the paths for longer rows
TILE_ELEMS = 4096  # elements per program tile for short rows (several rows per program)
ELEMS_PER_THREAD = 16  # two 128-bit vectors per thread per 16-bit tensor, four in float32
# Shared memory the backward's pipeline may fill per program. The backward runs one or two
# programs per SM (its registers allow no more), and a program must keep about 32 KB of loads
# in flight to cover DRAM latency at H100 bandwidth (3 TB/s x ~1.3 us / 132 SMs); 96 KB also
# leaves room for two programs per SM at hidden 4096 and fits the A100's 163 KB per block.
PIPELINE_SMEM = 96 * 1024


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: few programs keep it fast, several still exercise the partials


def rms_norm_config(n_cols: int, elem_bytes: int, kind: str, has_dh: bool = False) -> Config:
    """Block, warp and pipeline choice for one hidden size and dtype width.

    kind: "fwd", "bwd" (the dx/dweight kernel) or "bwd_stats" (rows longer than ROW_TILE_BWD).
    Memory-bound row kernels: each thread carries ELEMS_PER_THREAD elements of each tensor
    (enough 128-bit loads in flight without spilling); rows up to the register limit are held
    whole, longer ones are streamed in STREAM_CHUNK columns. The forward runs one tile per
    program and hides latency with several programs per SM; the backward loops over rows with
    its dweight share in registers, so it pipelines its loads instead.
    """
    limit = ROW_TILE_FWD if kind == "fwd" else ROW_TILE_BWD
    if kind == "bwd_stats" or n_cols > limit:
        block_m, block_n = 1, STREAM_CHUNK
    else:
        block_n = triton.next_power_of_2(n_cols)
        block_m = max(1, min(TILE_ELEMS // block_n, 256))
    num_warps = max(1, min(16, block_m * block_n // (32 * ELEMS_PER_THREAD)))
    num_stages = 1
    if kind == "bwd":
        stage_bytes = (3 if has_dh else 2) * block_m * block_n * elem_bytes
        num_stages = max(1, min(3, PIPELINE_SMEM // stage_bytes))
    return Config(block_m, block_n, num_warps, num_stages)


# ---------------------------------------------------------------------------- launchers
def _check(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor]) -> None:
    V.kernel_dtype(x, "x", "triton")
    V.kernel_dtype(weight, "weight", "triton")
    if residual is not None:
        V.kernel_dtype(residual, "residual", "triton")
    if x.shape[-1] > MAX_HIDDEN:
        raise ValueError(f"x: backend='triton' supports hidden sizes up to {MAX_HIDDEN}, got {x.shape[-1]}")


def _fwd_launch(x2, r2, w, y, h, eps: float) -> Launch:
    n_rows, n = x2.shape
    cfg = rms_norm_config(n, x2.element_size(), "fwd")
    has_res = r2 is not None
    args = dict(X=x2, R=r2 if has_res else x2, W=w, Y=y, H=h if has_res else y,
                stride_x=x2.stride(0), stride_r=(r2 if has_res else x2).stride(0), n_rows=n_rows, N=n,
                eps=eps, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, WHOLE_ROW=cfg.block_n >= n,
                HAS_RESIDUAL=has_res, SOFT_BF16=soft_bf16(x2))
    name = "rms_norm_fwd" + ("_residual" if has_res else "")
    return Launch(name, _rms_norm_fwd_kernel, args, cfg.num_warps, cfg.num_stages,
                  grid=(triton.cdiv(n_rows, cfg.block_m),))


def _bwd_launches(dy2, x2, dh2, w, dx, eps: float, compute_dw: bool, n_sms: int):
    """-> (stats launch or None, main launch, dweight partials buffer or None)."""
    n_rows, n = x2.shape
    has_dh = dh2 is not None
    cfg = rms_norm_config(n, x2.element_size(), "bwd", has_dh)
    n_col_tiles = triton.cdiv(n, cfg.block_n)
    row_tiles = triton.cdiv(n_rows, cfg.block_m)
    # Two programs per SM along the rows in all, so every SM has work and the partials stay
    # small (programs x N x 4 bytes against rows x N x 6 bytes of row traffic).
    programs_m = max(1, min(row_tiles, 2 * n_sms // n_col_tiles))
    rows_per_program = triton.cdiv(row_tiles, programs_m) * cfg.block_m
    programs_m = triton.cdiv(n_rows, rows_per_program)
    stats = None
    stats_launch = None
    if cfg.block_n < n:
        scfg = rms_norm_config(n, x2.element_size(), "bwd_stats")
        stats = torch.empty((n_rows, 2), dtype=torch.float32, device=x2.device)
        stats_launch = Launch("rms_norm_bwd_stats", _rms_norm_bwd_stats_kernel,
                              dict(DY=dy2, X=x2, W=w, STATS=stats, stride_dy=dy2.stride(0), stride_x=x2.stride(0),
                                   N=n, eps=eps, BLOCK_N=scfg.block_n),
                              scfg.num_warps, scfg.num_stages, grid=(n_rows,))
    partial = torch.empty((programs_m, n) if compute_dw else (1, 1), dtype=torch.float32, device=x2.device)
    args = dict(DY=dy2, X=x2, DH=dh2 if has_dh else dy2, W=w, STATS=stats if stats is not None else partial,
                DX=dx, DW_PARTIAL=partial, stride_dy=dy2.stride(0), stride_x=x2.stride(0),
                stride_dh=(dh2 if has_dh else dy2).stride(0), n_rows=n_rows, N=n, eps=eps,
                rows_per_program=rows_per_program, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                WHOLE_ROW=cfg.block_n >= n, HAS_DH=has_dh, COMPUTE_DW=compute_dw, NUM_STAGES=cfg.num_stages,
                SOFT_BF16=soft_bf16(x2))
    name = "rms_norm_bwd" + ("_residual" if has_dh else "")
    main = Launch(name, _rms_norm_bwd_kernel, args, cfg.num_warps, cfg.num_stages, grid=(programs_m, n_col_tiles))
    return stats_launch, main, (partial if compute_dw else None)


def _forward(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor], eps: float):
    _check(x, weight, residual)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    if x.numel() > 0:
        x2 = as_rows(x)
        r2 = as_rows(residual) if residual is not None else None
        _fwd_launch(x2, r2, weight.contiguous(), y.view(-1, x.shape[-1]),
                    h.view(-1, x.shape[-1]) if h is not None else None, eps).run()
    return y, h


# ---------------------------------------------------------------------------- torch ops
@torch.library.custom_op("meditron_kernels::triton_rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., N), weight (N,) -> y (..., N)."""
    return _forward(x, weight, None, eps)[0]


@rms_norm_op.register_fake
def _(x, weight, eps):
    _check(x, weight, None)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("meditron_kernels::triton_rms_norm_residual", mutates_args=())
def rms_norm_residual_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual (..., N), weight (N,) -> y, h = x + residual, each (..., N)."""
    return _forward(x, weight, residual, eps)


@rms_norm_residual_op.register_fake
def _(x, residual, weight, eps):
    _check(x, weight, residual)
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(x.shape, dtype=x.dtype, device=x.device))


@torch.library.custom_op("meditron_kernels::triton_rms_norm_backward", mutates_args=())
def rms_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dh: Optional[torch.Tensor],
                         eps: float, compute_dweight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, x (..., N) [x is h in the fused case], weight (N,), dh (..., N) or None
    -> dx (..., N) in x.dtype, dweight (N,) in weight.dtype (empty when not compute_dweight)."""
    n = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        dw = torch.zeros(n if compute_dweight else 0, dtype=weight.dtype, device=x.device)
        return dx, dw
    stats_launch, main, partial = _bwd_launches(as_rows(dy), as_rows(x), as_rows(dh) if dh is not None else None,
                                                weight.contiguous(), dx.view(-1, n), eps, compute_dweight,
                                                _num_sms(x.device))
    if stats_launch is not None:
        stats_launch.run()
    main.run()
    dw = partial.sum(0).to(weight.dtype) if compute_dweight else weight.new_empty(0)
    return dx, dw


@rms_norm_backward_op.register_fake
def _(dy, x, weight, dh, eps, compute_dweight):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            weight.new_empty(weight.shape[0] if compute_dweight else 0))


def _setup_plain(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _backward_plain(ctx, dy):
    x, weight = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = rms_norm_backward_op(dy, x, weight, None, ctx.eps, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None


def _setup_residual(ctx, inputs, output):
    _, _, weight, eps = inputs
    ctx.save_for_backward(output[1], weight)  # h: the normalised tensor, kept alive downstream anyway
    ctx.eps = eps


def _backward_residual(ctx, dy, dh):
    h, weight = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[2]
    dh_total, dw = rms_norm_backward_op(dy, h, weight, dh, ctx.eps, need_dw)
    # h = x + residual: both receive the whole gradient of h, as torch's add does.
    gx = dh_total if ctx.needs_input_grad[0] else None
    gr = dh_total if ctx.needs_input_grad[1] else None
    return gx, gr, (dw if need_dw else None), None


rms_norm_op.register_autograd(_backward_plain, setup_context=_setup_plain)
rms_norm_residual_op.register_autograd(_backward_residual, setup_context=_setup_residual)


@register("rms_norm", "triton")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, residual: Optional[torch.Tensor] = None):
    """x (..., N), weight (N,) -> y (..., N), or (y, h) with h = x + residual."""
    if residual is None:
        return rms_norm_op(x, weight, float(eps))
    return rms_norm_residual_op(x, residual, weight, float(eps))


# ---------------------------------------------------------------------------- static checks
def static_launches() -> list[Launch]:
    """The launches of a 16k-token bf16 step at hidden 4096 and 8192 (row-tile paths), and at
    65536 (the streaming paths), built by the run-time launch functions on meta tensors."""
    out = []
    rows = 16384
    for n in (4096, 8192, 65536):
        def t():
            return torch.empty((rows, n), dtype=torch.bfloat16, device="meta")

        w = torch.empty(n, dtype=torch.bfloat16, device="meta")
        for fused in (False, True):
            out.append(_fwd_launch(t(), t() if fused else None, w, t(), t() if fused else None, 1e-5))
            stats, main, _ = _bwd_launches(t(), t(), t() if fused else None, w, t(), 1e-5, True, n_sms=132)
            if stats is not None and not fused:
                out.append(stats)
            out.append(main)
    for launch in out:
        launch.name += f"[hidden={launch.args['N']}]"
    return out
