"""Cross-entropy over a vocabulary from one online-softmax pass, and the chunked lm-head +
cross-entropy that never holds more than one chunk of logits.

Per row the forward kernel makes one pass over the vocabulary keeping a running max and a
running sum of exponentials (the online softmax): the loss and the row's log-sum-exp cost one
read of the logits. The gradient, (softmax - onehot(target)) * grad_output / n_valid, is one
more sweep that reads the row and writes its gradient.

- ``cross_entropy`` runs that sweep in the backward, from the saved log-sum-exp and the real
  grad_output. Bytes per bf16 row at vocab 32000: 64 KB read forward, 64 KB read and 64 KB
  written backward, and one rounding of each gradient element. Writing the gradient during
  the forward instead would cost a full extra pass (scaling it by grad_output in the backward)
  and a second rounding of every 16-bit gradient element whenever grad_output != 1.
  The caller's logits are only read; autograd keeps them for the backward, as torch does.
- ``fused_linear_cross_entropy`` must finish each chunk before the next, so there the forward
  kernel writes the gradient (scaled by 1 / n_valid) in place over the chunk's own logits, and
  the dhidden / dweight GEMMs consume it at once; the backward scales the results.

Targets: ``ignore_index`` rows contribute nothing and are not counted in the mean; if every
target is ignored the loss is NaN (0 / 0) and the gradient is zero, as in torch. A target
outside [0, vocab) that is not ``ignore_index`` is never dereferenced: its row's loss is
NaN, which makes the mean NaN (torch raises instead; checking would cost a host sync), and
its gradient row is the softmax alone, scaled like any counted row.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from .. import _validate as V
from ..backend import register
from ..reference import default_chunk_size
from ._common import Launch, cast_rtne, soft_bf16, unit_stride


# ---------------------------------------------------------------------------- kernels
@triton.jit
def _gradient_sweep(
    x_row,          # this row's logits
    g_row,          # this row's gradient (may be x_row: each step is read before it is written)
    target,         # int64 class index of the row, relative to this slice of the vocabulary
    m,              # float32 max of the row (over the whole vocabulary)
    inv_s,          # float32 1 / sum(exp(x - m)) of the row (over the whole vocabulary)
    scale,          # float32 d loss / d (row loss): grad_output / n_valid, or 0 for ignored rows
    n_cols,
    BLOCK_V: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    # softmax = exp(x - m) / s, with m and s kept apart: exp(x - lse) with lse = m + log(s)
    # rounded to float32 puts lse's rounding (an ulp of |m|, 4e-6 at |m| ~ 50) on every
    # probability; x - m is exact near the max and 1 / s costs one rounding.
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        mask = start + cols < n_cols
        x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - m) * inv_s - tl.where(start + cols == target, 1.0, 0.0)
        tl.store(g_row + start + cols, cast_rtne(g * scale, g_row.dtype.element_ty, SOFT_BF16), mask=mask)


@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr,     # (n_rows, n_cols) logits, unit column stride; overwritten by the gradient if GRAD_IN_PLACE
    stride_row,     # elements between rows of logits
    targets_ptr,    # (n_rows,) int32 or int64 class indices (of the whole vocabulary)
    loss_ptr,       # (n_rows,) float32 per-row loss out, 0 for ignored rows (unused if PARTIAL)
    stats_ptr,      # (3, n_rows) float32 out: row max m, sum(exp(x - m)), target logit (0 off this slice)
    n_valid_ptr,    # () integer count of targets != ignore_index, read on the device (no host sync)
    n_rows,
    n_cols,         # vocab size of this slice
    vocab_start,    # first class of this slice (0 unless the vocabulary is split over ranks)
    ignore_index,   # rows whose target equals this contribute no loss and no gradient
    BLOCK_V: tl.constexpr,        # vocab columns per step
    GRAD_IN_PLACE: tl.constexpr,  # then overwrite the logits with d(mean loss)/d(logits)
    PARTIAL: tl.constexpr,        # a vocabulary slice: only the statistics, combined across ranks later
    SOFT_BF16: tl.constexpr,      # round a bf16 gradient by hand (interpreter only, see _common.cast_rtne)
):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)

    # Online softmax: m is the running max, s the sum of exp(x - m) so far. One block-wide max
    # and sum per step keeps it at one exp per element. The shift m_safe stays finite so that a
    # step of all -inf (a masked vocabulary) adds 0 instead of NaN.
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        x = tl.load(x_row + start + cols, mask=start + cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
        m = m_new

    target = tl.load(targets_ptr + row).to(tl.int64)
    ignored = target == ignore_index
    local = target - vocab_start
    in_slice = (local >= 0) & (local < n_cols)
    x_target = tl.load(x_row + local, mask=in_slice & ~ignored, other=0.0).to(tl.float32)
    tl.store(stats_ptr + row, m)
    tl.store(stats_ptr + n_rows + row, s)
    tl.store(stats_ptr + 2 * n_rows + row, x_target)
    if not PARTIAL:
        # (m - x_target) + log(s): the large terms cancel first
        loss = tl.where(in_slice, (m - x_target) + tl.log(s), float("nan"))
        tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
        if GRAD_IN_PLACE:
            scale = tl.where(ignored, 0.0, 1.0 / tl.maximum(tl.load(n_valid_ptr), 1).to(tl.float32))
            _gradient_sweep(x_row, x_row, local, m, 1.0 / s, scale, n_cols, BLOCK_V, SOFT_BF16)


@triton.jit
def _cross_entropy_bwd_kernel(
    logits_ptr,     # (n_rows, n_cols) logits of the forward, unit column stride
    stride_row,     # elements between rows of logits
    grad_ptr,       # (n_rows, n_cols) d loss / d logits out, contiguous (may be logits_ptr if that is too)
    targets_ptr,    # (n_rows,) int32 or int64 class indices (of the whole vocabulary)
    stats_ptr,      # (>= 2, n_rows) float32: row max and sum(exp(x - m)) over the whole vocabulary
    n_valid_ptr,    # () integer count of targets != ignore_index
    grad_out_ptr,   # () float32 d(output)/d(mean loss): the incoming gradient
    n_rows,
    n_cols,         # vocab size of this slice
    vocab_start,    # first class of this slice
    ignore_index,
    BLOCK_V: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row).to(tl.int64)
    scale = tl.load(grad_out_ptr).to(tl.float32) / tl.maximum(tl.load(n_valid_ptr), 1).to(tl.float32)
    scale = tl.where(target == ignore_index, 0.0, scale)
    m = tl.load(stats_ptr + row)
    inv_s = 1.0 / tl.load(stats_ptr + n_rows + row)
    _gradient_sweep(logits_ptr + row * stride_row, grad_ptr + row * n_cols, target - vocab_start, m, inv_s,
                    scale, n_cols, BLOCK_V, SOFT_BF16)


# ---------------------------------------------------------------------------- config
# A step of 4096 columns is 8 KiB of bf16 per program: with 8 warps each thread loads 16
# values (two 128-bit vectors). At the 32-36 registers these compile to, 6-8 CTAs (48-64
# warps) fit an SM: 6-8 MB of loads in flight across an H100, twice the ~3 MB Little's law
# asks for at 3 TB/s. A larger step only adds masked waste on the last one (32000 = 7 x 4096
# + 3328) and register pressure.
_MAX_BLOCK_V = 4096
_ELEMS_PER_THREAD = 16


def cross_entropy_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of both cross-entropy kernels: used by the launchers and by static_launches()."""
    block_v = min(triton.next_power_of_2(max(n_cols, 1)), _MAX_BLOCK_V)
    num_warps = max(1, min(8, block_v // (32 * _ELEMS_PER_THREAD)))
    return block_v, num_warps


# ---------------------------------------------------------------------------- launchers
def _fwd_launch(logits, targets, losses, stats, n_valid, ignore_index: int, grad_in_place: bool,
                vocab_start: int = 0, partial: bool = False) -> Launch:
    """The forward over the rows of 2-D ``logits`` (meta tensors are fine for static checks)."""
    n_rows, n_cols = logits.shape
    block_v, num_warps = cross_entropy_config(n_cols)
    args = dict(logits_ptr=logits, stride_row=logits.stride(0), targets_ptr=targets, loss_ptr=losses,
                stats_ptr=stats, n_valid_ptr=n_valid, n_rows=n_rows, n_cols=n_cols, vocab_start=vocab_start,
                ignore_index=ignore_index, BLOCK_V=block_v, GRAD_IN_PLACE=grad_in_place, PARTIAL=partial,
                SOFT_BF16=soft_bf16(logits))
    name = ("cross_entropy_partial_stats" if partial else
            "cross_entropy_fwd_grad_in_place" if grad_in_place else "cross_entropy_fwd")
    return Launch(name, _cross_entropy_fwd_kernel, args, num_warps=num_warps, num_stages=1, grid=(n_rows,))


def _bwd_launch(logits, grad, targets, stats, n_valid, grad_out, ignore_index: int,
                vocab_start: int = 0) -> Launch:
    n_rows, n_cols = logits.shape
    block_v, num_warps = cross_entropy_config(n_cols)
    args = dict(logits_ptr=logits, stride_row=logits.stride(0), grad_ptr=grad, targets_ptr=targets, stats_ptr=stats,
                n_valid_ptr=n_valid, grad_out_ptr=grad_out, n_rows=n_rows, n_cols=n_cols, vocab_start=vocab_start,
                ignore_index=ignore_index, BLOCK_V=block_v, SOFT_BF16=soft_bf16(grad))
    return Launch("cross_entropy_bwd", _cross_entropy_bwd_kernel, args, num_warps=num_warps, num_stages=1,
                  grid=(n_rows,))


def _count_valid(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return (targets != ignore_index).sum()


def _mean(losses: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
    # The sum of n row losses of ~10 each rounds at the magnitude of the sum in float32; a
    # float64 sum (n values, negligible next to the logits) keeps the mean within an ulp or so.
    return (losses.sum(dtype=torch.float64) / n_valid).float()


# ---------------------------------------------------------------------------- torch.library: cross_entropy
@torch.library.custom_op("meditron_kernels::triton_cross_entropy", mutates_args=())
def _cross_entropy_op(logits: torch.Tensor, targets: torch.Tensor,
                      ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (n, vocab), targets (n,) -> (mean loss () float32, per-row statistics (3, n) float32:
    max, sum of exp(x - max), target logit)."""
    logits = unit_stride(logits)
    n_rows = logits.shape[0]
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    stats = torch.empty((3, n_rows), dtype=torch.float32, device=logits.device)
    n_valid = _count_valid(targets, ignore_index)
    _fwd_launch(logits, targets, losses, stats, n_valid, ignore_index, False).run()
    return _mean(losses, n_valid), stats


@_cross_entropy_op.register_fake
def _(logits, targets, ignore_index):
    return logits.new_empty((), dtype=torch.float32), logits.new_empty((3, logits.shape[0]), dtype=torch.float32)


@torch.library.custom_op("meditron_kernels::triton_cross_entropy_backward", mutates_args=())
def _cross_entropy_backward_op(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                               stats: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """grad_loss (), logits (n, vocab), targets (n,), stats (3, n) -> d loss / d logits (n, vocab) in logits.dtype."""
    logits = unit_stride(logits)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    n_valid = _count_valid(targets, ignore_index)
    grad_out = grad_loss.to(torch.float32).reshape(())
    _bwd_launch(logits, grad, targets, stats, n_valid, grad_out, ignore_index).run()
    return grad


@_cross_entropy_backward_op.register_fake
def _(grad_loss, logits, targets, stats, ignore_index):
    return logits.new_empty(logits.shape)


def _ce_setup_context(ctx, inputs, output):
    logits, targets, ignore_index = inputs
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)  # no zero-filled "gradient" of the statistics
    ctx.save_for_backward(logits, targets, stats)
    ctx.ignore_index = ignore_index


def _ce_backward(ctx, grad_loss, _grad_stats):
    logits, targets, stats = ctx.saved_tensors
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return None, None, None
    return _cross_entropy_backward_op(grad_loss, logits, targets, stats, ctx.ignore_index), None, None


_cross_entropy_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


@register("cross_entropy", "triton")
def cross_entropy(logits, targets, ignore_index=-100):
    """logits (..., vocab), targets (...) -> float32 scalar, mean over targets != ignore_index.

    Never writes into ``logits``; the backward writes the gradient into a buffer of its own.
    """
    V.kernel_dtype(logits, "logits", "triton")
    loss, _ = _cross_entropy_op(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index)
    return loss


# ---------------------------------------------------------------------------- fused linear + cross-entropy
# torch 2.13 renamed all_gather_into_tensor (flat tensors: what gloo accepts too)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _resolve_group(group_name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def _combine_slices(stats: torch.Tensor, targets: torch.Tensor, vocab: int, ignore_index: int):
    """Per-token statistics of every rank's vocabulary slice -> the whole vocabulary's.

    stats (tp, 3, n): each slice's max, sum(exp(x - max)) and target logit (0 off the slice);
    -> m (n,), s (n,) over the whole vocabulary and the per-token losses (n,) float32, with
    the conventions of the one-process kernel (0 for ignored tokens, NaN for targets outside
    [0, vocab))."""
    m_r, s_r, x_r = stats.unbind(1)
    m = m_r.amax(0)
    m_safe = torch.where(m == float("-inf"), 0.0, m)
    s = (s_r * torch.exp(m_r - m_safe)).sum(0)
    loss = (m - x_r.sum(0)) + torch.log(s)
    in_range = (targets >= 0) & (targets < vocab)
    loss = torch.where(in_range, loss, float("nan"))
    return m, s, torch.where(targets == ignore_index, 0.0, loss)


def _fused_linear_cross_entropy(hidden, weight, targets, ignore_index: int, chunk_size: int,
                                grad_hidden: bool, grad_weight: bool, group_name: str = ""):
    # hidden (n, dim), weight (vocab, dim) or this rank's (vocab / tp, dim) slice, targets (n,)
    # -> loss () float32, dhidden (n, dim) or (0,), dweight (vocab [/ tp], dim) float32 or (0,)
    hidden = unit_stride(hidden)
    weight = unit_stride(weight)
    n, dim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    with_grad = grad_hidden or grad_weight
    group = _resolve_group(group_name) if group_name else None
    n_valid = _count_valid(targets, ignore_index)
    losses = torch.empty(n, dtype=torch.float32, device=dev)
    # Over a vocabulary split across ranks dhidden is a sum of the ranks' partial products:
    # summed in float32 so that the all-reduce adds no rounding to a 16-bit result.
    dh_dtype = torch.float32 if group is not None and hidden.element_size() < 4 else hidden.dtype
    dhidden = torch.empty((n, dim) if grad_hidden else (0,), dtype=dh_dtype, device=dev)
    dweight = torch.zeros((vocab, dim) if grad_weight else (0,), dtype=torch.float32, device=dev)
    # The one chunk of logits, reused by every chunk; the kernel overwrites it in place with
    # its gradient (the buffer is ours, so that is safe), which the two GEMMs then consume.
    chunk = max(1, min(chunk_size, n))
    buf = torch.empty((chunk, vocab), dtype=hidden.dtype, device=dev)
    stats = torch.empty((3, chunk), dtype=torch.float32, device=dev)
    if group is not None:
        tp, vocab_start = group.size(), group.rank() * vocab
        gathered = torch.empty(tp * 3 * chunk, dtype=torch.float32, device=dev)
        one = torch.ones((), dtype=torch.float32, device=dev)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = stop - start
        h, t = hidden[start:stop], targets[start:stop]
        logits = torch.mm(h, weight.t(), out=buf[:rows])
        st = stats[:, :rows] if rows == chunk else stats.new_empty((3, rows))
        if group is None:
            _fwd_launch(logits, t, losses[start:stop], st, n_valid, ignore_index, with_grad).run()
        else:
            # Megatron's vocab-parallel loss: each rank reduces its slice of the vocabulary and
            # only 3 floats per token cross the group, in one all-gather per chunk.
            _fwd_launch(logits, t, losses, st, n_valid, ignore_index, False, vocab_start, partial=True).run()
            g = gathered[: tp * 3 * rows]
            _all_gather(g, st.contiguous().view(-1), group=group)
            m, s, losses[start:stop] = _combine_slices(g.view(tp, 3, rows), t, vocab * tp, ignore_index)
            if with_grad:
                whole = torch.stack([m, s])
                _bwd_launch(logits, logits, t, whole, n_valid, one, ignore_index, vocab_start).run()
        if grad_hidden:
            if dh_dtype == logits.dtype:
                torch.mm(logits, weight, out=dhidden[start:stop])
            else:
                dhidden[start:stop] = torch.mm(logits, weight)
        if grad_weight:
            if dweight.dtype == logits.dtype:
                dweight.addmm_(logits.t(), h)
            else:
                # A 16-bit GEMM rounds each chunk's product once; the running sum stays float32.
                dweight += torch.mm(logits.t(), h)
    if group is not None and grad_hidden:
        dist.all_reduce(dhidden, group=group)
        dhidden = dhidden.to(hidden.dtype)
    return _mean(losses, n_valid), dhidden, dweight


@torch.library.custom_op("meditron_kernels::triton_fused_linear_cross_entropy", mutates_args=())
def _fused_linear_cross_entropy_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int, chunk_size: int, grad_hidden: bool,
                                   grad_weight: bool, group_name: str = "") -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
    """hidden (n, dim), weight (vocab, dim), targets (n,) -> (mean loss () float32,
    d loss / d hidden (n, dim) or (0,), d loss / d weight (vocab, dim) float32 or (0,)).

    group_name: "" for one process, or the name of the process group over whose ranks the
    vocabulary is split, rank r holding weight rows [r * vocab, (r + 1) * vocab); the loss is
    then over the whole vocabulary and dhidden summed over the group."""
    return _fused_linear_cross_entropy(hidden, weight, targets, ignore_index, chunk_size, grad_hidden, grad_weight,
                                       group_name)


@_fused_linear_cross_entropy_op.register_fake
def _(hidden, weight, targets, ignore_index, chunk_size, grad_hidden, grad_weight, group_name=""):
    dhidden = hidden.new_empty(hidden.shape if grad_hidden else (0,))
    dweight = weight.new_empty(weight.shape if grad_weight else (0,), dtype=torch.float32)
    return hidden.new_empty((), dtype=torch.float32), dhidden, dweight


def _flce_setup_context(ctx, inputs, output):
    _, dhidden, dweight = output
    ctx.mark_non_differentiable(dhidden, dweight)
    ctx.set_materialize_grads(False)  # no zero-filled "gradients" of dhidden and dweight
    ctx.save_for_backward(dhidden, dweight)
    ctx.weight_dtype = inputs[1].dtype


def _flce_backward(ctx, grad_loss, _g1, _g2):
    dhidden, dweight = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None, None, None, None
    for i, (g, name) in enumerate(((dhidden, "grad_hidden"), (dweight, "grad_weight"))):
        if ctx.needs_input_grad[i] and g.dim() != 2:
            raise RuntimeError(f"triton_fused_linear_cross_entropy was called with {name}=False, "
                               "so it has no gradient to give")
    dh = dhidden * grad_loss if ctx.needs_input_grad[0] else None
    dw = (dweight * grad_loss).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
    return dh, dw, None, None, None, None, None, None


_fused_linear_cross_entropy_op.register_autograd(_flce_backward, setup_context=_flce_setup_context)


@register("fused_linear_cross_entropy", "triton")
def fused_linear_cross_entropy(hidden, weight, targets, ignore_index=-100, chunk_size=None, process_group=None):
    """hidden (..., dim), weight (vocab, dim) or this rank's vocabulary slice, targets (...)
    -> float32 scalar mean loss.

    Peak extra memory: one (chunk_size, vocab) logits buffer, plus the gradients themselves
    (dhidden, and dweight in float32) when autograd will ask for them.
    """
    V.kernel_dtype(hidden, "hidden", "triton")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if chunk_size is None:
        chunk_size = default_chunk_size(h.shape[0], h.shape[1], weight.shape[0])
    grad_on = torch.is_grad_enabled()
    group_name = process_group.group_name if process_group is not None else ""
    loss, _, _ = _fused_linear_cross_entropy_op(h, weight, t, ignore_index, chunk_size,
                                                grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
                                                group_name)
    return loss


# ---------------------------------------------------------------------------- static checks
def static_launches() -> list[Launch]:
    """The run-time launches at 16k bf16 tokens over Llama-2's 32000-word vocabulary: the
    forward, its backward, the forward that writes the gradient in place (fused linear), and
    the statistics of one vocabulary slice (vocabulary-parallel fused linear)."""
    n, vocab = 16384, 32000
    n_vocab_start = 32000  # the second rank's slice of a vocabulary split over ranks
    logits = torch.empty(n, vocab, dtype=torch.bfloat16, device="meta")
    grad = torch.empty(n, vocab, dtype=torch.bfloat16, device="meta")
    targets = torch.empty(n, dtype=torch.int64, device="meta")
    rows = torch.empty(n, dtype=torch.float32, device="meta")
    n_valid = torch.empty((), dtype=torch.int64, device="meta")
    grad_out = torch.empty((), dtype=torch.float32, device="meta")
    stats = torch.empty(3, n, dtype=torch.float32, device="meta")
    return [_fwd_launch(logits, targets, rows, stats, n_valid, -100, False),
            _bwd_launch(logits, grad, targets, stats, n_valid, grad_out, -100),
            _fwd_launch(logits, targets, rows, stats, n_valid, -100, True),
            _fwd_launch(logits, targets, rows, stats, n_valid, -100, False, vocab_start=n_vocab_start, partial=True)]
