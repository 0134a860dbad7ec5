"""Flash attention in Triton: causal and not, GQA, packed documents, fused rotary, fewer queries than
keys (a KV cache, decoding); forward and backward.

Shapes follow flash-attn. Batched: q (batch, sq, n_heads, d), k and v (batch, sk, n_kv_heads, d),
optionally with LENS_K (seqlens_k) keys per sequence. Packed: q (total_q, n_heads, d), k and v
(total_k, n_kv_heads, d), documents delimited by cu_seqlens (queries) and cu_seqlens_k (keys). Query
head h reads kv head h // (n_heads // n_kv_heads) in place; k and v are never expanded. Causal
attention is bottom-right aligned: query row r of a sequence with Lq queries and Lk keys is key row
r + Lk - Lq and sees the keys up to it.

Three kernels, each an exact online-softmax pass over (query block x key block) tiles:
  _attn_fwd       o, and the log-sum-exp of every query row;
  _attn_bwd_dq    delta = rowsum(o * do) - dlse, kept for the next kernel, and dq;
  _attn_bwd_dkdv  dk and dv: one program owns one key block of one kv head and walks the query heads
                  of its group, so the GQA reduction happens in registers, in a fixed order.
Every output element is written by exactly one program: no atomics, bit-identical reruns. The price
is that the dq program recomputes q k^T and do v^T (7 block matmuls per tile pair instead of 5).
Decoding (a few query rows per kv head) takes two more in the forward: _attn_decode, one program per
(sequence, kv head, key split) with every query row of the group in one tile, and
_attn_decode_reduce, which merges the splits by their log-sum-exps.

Causal blocks above the diagonal are never visited, and only diagonal blocks pay for a mask. In a
pack, every loop is bounded by the program's own document: blocks of other documents are skipped,
not masked.

Sliding window (window=(left, right), FlashAttention's window_size): the constexprs WIN_LEFT and
WIN_RIGHT narrow every loop to the key (dk/dv: query) blocks that meet the program's band, masked
only at its two edges; blocks outside it are never loaded. Without a window (-1, -1) the kernels
compile exactly as before. docs/attention.md, "Sliding-window (local) attention".

Rotary: q and k are rotated in registers as they are loaded, as two rotate-half halves that stay
separate tiles (q k^T is the sum of the halves' products, so no register shuffles). The forward
rotates its query block once and every key block it visits. The dq kernel does the same, and hands
the rotated q it has made to the dk/dv kernel, which rotates its one key tile itself and therefore
streams plain query tiles. dq and dk are rotated back (the conjugate rotation) just before their
one store. Position ids index the keys; a query takes the position of its key row.

On sm_90 every q/k/v/do tile comes in through a TMA descriptor made in the kernel, one per
(document, head), whose bounds are the document's: rows past its end arrive as zeros, never as the
next document. On sm_80, for fp32, and where a stride breaks TMA's 16-byte rule, the same kernels
use masked pointer loads (as the decoding kernels always do).

WARP_SPEC (sm_90 candidates the autotuner may pick; docs/attention.md): the same kernels with their
loop warp-specialized by Triton into a TMA producer and two MMA consumer warp groups. Within that
pass's limits each kernel has one loop, every block masked, and the backward reads its statistics
from a first pass, _attn_bwd_stats, through TMA.

The package, one kernel family per file:
  tiles.py     tile helpers shared by the kernels;
  forward.py   _attn_fwd;
  backward.py  _attn_bwd_dq, _attn_bwd_dkdv, _attn_bwd_stats;
  decode.py    _attn_decode, _attn_decode_reduce;
  configs.py   the tile tables, TMA and warp-specialization eligibility, the autotuner, and
               overrides(), the context manager through which tests and benchmarks pin its choices;
  problem.py   Problem: one call as the kernels see it, built once per op call;
  op.py        the drivers, the custom ops and their autograd, the registration, static_launches().
"""
from .configs import (DECODE_MAX_ROWS, DECODE_MIN_SPLIT, MAX_HEAD_DIM, Config, Overrides, candidates, decode_config,
                      decode_splits, default_config, overrides, use_tma, warp_spec_ok)
from .op import flash_attention, static_launches
from .problem import Problem

__all__ = ["Config", "DECODE_MAX_ROWS", "DECODE_MIN_SPLIT", "MAX_HEAD_DIM", "Overrides", "Problem", "candidates",
           "decode_config", "decode_splits", "default_config", "flash_attention", "overrides", "static_launches",
           "use_tma", "warp_spec_ok"]
