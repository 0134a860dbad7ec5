"""Where attention's fp32 dk error comes from: the Triton kernel (under the interpreter), torch in
fp32 and three float64 emulations of the backward's rounding, each against a float64 reference, in
fp32 ulps (2**-23) of max|dk|. The numbers behind FP32_FLOOR_ULPS in tests/helpers.py:

    python scripts/attention_fp32_error.py            # head_dim 256 and 64, four seeds each

Emulations (sums in float64 unless said, every stored value rounded to fp32):
  kernel            the kernel's rounding points: scores * (scale * log2 e), exp2 against lse * log2 e
  base2-lse         the same with the log-sum-exp kept in base 2 (one rounding fewer)
  exact-exponent    the probabilities rounded once from exact values
  sequential-dots   QK^T and dO V^T summed term by term in fp32, as a loop over head_dim does
"""
import math
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import meditron_kernels as mk  # noqa: E402

EPS = torch.finfo(torch.float32).eps


def r(t):
    return t.float().double()


def grads(backend, q, k, v, g, scale):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = mk.flash_attention(q, k, v, causal=True, softmax_scale=scale, backend=backend)
    return torch.autograd.grad(o, (q, k, v), g.to(o.dtype))


def seqdot(a, b):
    # (b, q, h, d) x (b, k, h, d) -> (b, h, q, k), summed one term at a time in fp32
    a, b = a.float().transpose(1, 2), b.float().transpose(1, 2)
    acc = torch.zeros(a.shape[0], a.shape[1], a.shape[2], b.shape[2])
    for i in range(a.shape[-1]):
        acc = acc + a[..., i, None] * b[..., None, :, i]
    return acc.double()


def emulated_dk(q, k, v, g, scale, variant):
    h = q.shape[2]
    q, k, v = q.double(), k.double().expand(-1, -1, h, -1), v.double().expand(-1, -1, h, -1)
    s = seqdot(q, k) if variant == "sequential-dots" else torch.einsum("bqhd,bkhd->bhqk", q, k)
    n = q.shape[1]
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    s64 = (s * scale).masked_fill(~mask, -math.inf)
    lse64 = torch.logsumexp(s64, -1)
    p64 = torch.exp(s64 - lse64[..., None])
    log2e = 1 / math.log(2)
    if variant == "exact-exponent":
        p = r(p64)
    elif variant == "sequential-dots":
        p = r(torch.exp2(r(r(s * r(torch.tensor(scale * log2e))) - r(lse64 * log2e)[..., None]))).masked_fill(~mask, 0)
    else:
        s2 = r(r(s) * r(torch.tensor(scale * log2e, dtype=torch.float64)))
        lse2 = r(r(lse64) * r(torch.tensor(log2e))) if variant == "kernel" else r(lse64 * log2e)
        p = r(torch.exp2(r(s2 - lse2[..., None]))).masked_fill(~mask, 0)
    o = r(torch.einsum("bhqk,bkhd->bqhd", p64, v))
    dp = seqdot(g, v) if variant == "sequential-dots" else r(torch.einsum("bqhd,bkhd->bhqk", g, v))
    delta = r((o * g).sum(-1)).transpose(1, 2)
    ds = r(p * r(dp - delta[..., None]))
    return (torch.einsum("bhqk,bqhd->bkhd", ds, q) * scale).sum(2, keepdim=True)


def main():
    torch.set_num_threads(1)
    for d in (256, 64):
        for seed in range(4):
            torch.manual_seed(seed)
            q, k, v = torch.randn(1, 9, 2, d), torch.randn(1, 9, 1, d), torch.randn(1, 9, 1, d)
            g = torch.randn(q.shape, dtype=torch.float64).float().double()
            scale = 0.3
            ref = grads("torch", q.double(), k.double(), v.double(), g, scale)[1]
            m = ref.abs().max().item()

            def ulps(t):
                return (t.double() - ref).abs().max().item() / EPS / m

            cols = {"triton": ulps(grads("triton", q, k, v, g, scale)[1]),
                    "torch-fp32": ulps(grads("torch", q, k, v, g, scale)[1])}
            for variant in ("kernel", "base2-lse", "exact-exponent", "sequential-dots"):
                cols[variant] = ulps(emulated_dk(q, k, v, g, scale, variant))
            print(f"d={d:3} seed {seed}: " + "  ".join(f"{k_} {v_:5.1f}" for k_, v_ in cols.items()), flush=True)


if __name__ == "__main__":
    main()
