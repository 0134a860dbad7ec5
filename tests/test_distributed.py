"""Sharding rules of the Triton ops on DTensors (meditron_kernels/distributed.py), on gloo.

Each op runs on DTensors split the way tensor and sequence parallelism split them, and its
outputs and every gradient must equal the same op on the whole tensors in one process. The
weight gradient of a norm under a sequence split must come out Partial and sum to the whole
one: a rule that labelled it Replicate would give each rank its own share silently.
"""
import socket

import pytest
import torch

import meditron_kernels as mk

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _grads(fn, inputs):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point() and t.requires_grad) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.manual_seed(1)
    cot = [torch.randn(o.shape) for o in outs]
    torch.autograd.backward(outs, cot)
    return [o.detach() for o in outs], [t.grad for t in leaves]


def _cases():
    torch.manual_seed(0)
    b, s, h, hkv, d, n = 2, 6, 4, 2, 16, 24
    cos, sin = mk.rotary_cos_sin(s, d)

    def norm(x, w):
        return mk.rms_norm(x, w, 1e-5, backend="triton")

    def norm_res(x, r, w):
        return mk.rms_norm(x, w, 1e-5, residual=r, backend="triton")

    def swiglu(g, u):
        return mk.swiglu(g, u, backend="triton")

    def attention(q, k, v, cos, sin):
        return mk.flash_attention(q, k, v, causal=True, rotary=(cos, sin), backend="triton")

    def rotary(q, k, cos, sin):
        return mk.apply_rotary(q, k, cos, sin, backend="triton")

    x, r, w = torch.randn(b, s, n), torch.randn(b, s, n), torch.randn(n).requires_grad_()
    q, k, v = torch.randn(b, s, h, d), torch.randn(b, s, hkv, d), torch.randn(b, s, hkv, d)
    for t in (x, r, q, k, v):
        t.requires_grad_()
    g, u = torch.randn(b, s, n, requires_grad=True), torch.randn(b, s, n, requires_grad=True)
    # (name, fn, inputs, placement index per input: a dim to split, or None for replicated)
    return [
        ("rms_norm sequence-split", norm, [x, w], [1, None]),
        ("rms_norm replicated", norm, [x, w], [None, None]),
        ("rms_norm residual sequence-split", norm_res, [x, r, w], [1, 1, None]),
        ("swiglu column-split", swiglu, [g, u], [2, 2]),
        ("attention head-split", attention, [q, k, v, cos, sin], [2, 2, 2, None, None]),
        ("attention batch-split", attention, [q, k, v, cos, sin], [0, 0, 0, None, None]),
        ("rotary head-split", rotary, [q, k, cos, sin], [2, 2, None, None]),
    ]


def _worker(rank, port, out_dir):
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import meditron_kernels.distributed  # noqa: F401  (registers the rules)

    os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    results = []
    for name, fn, inputs, dims in _cases():
        placements = [(Replicate(),) if dim is None else (Shard(dim),) for dim in dims]
        dts = [distribute_tensor(t.detach(), mesh, p, src_data_rank=None).requires_grad_(t.requires_grad)
               for t, p in zip(inputs, placements)]
        out = fn(*dts)
        outs = out if isinstance(out, tuple) else (out,)
        torch.manual_seed(1)
        cot = [torch.randn(o.shape) for o in outs]  # the whole cotangent, split like the output
        cot = [distribute_tensor(c, mesh, o.placements, src_data_rank=None) for c, o in zip(cot, outs)]
        torch.autograd.backward(outs, cot)
        grads = []
        for t in dts:
            g = t.grad
            grads.append(None if g is None else (tuple(str(p) for p in g.placements), g.full_tensor()))
        results.append(([o.full_tensor() for o in outs], grads))
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.distributed
def test_sharding_rules_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
    got = torch.load(tmp_path / "rank0.pt")
    for (name, fn, inputs, dims), (outs, grads) in zip(_cases(), got):
        want_outs, want_grads = _grads(fn, inputs)
        for o, e in zip(outs, want_outs):
            torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} output: {m}")
        for got_grad, e in zip(grads, want_grads):
            assert (got_grad is None) == (e is None), name
            if e is not None:
                torch.testing.assert_close(got_grad[1], e, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} gradient: {m}")
        if name == "rms_norm sequence-split":
            from torch.distributed.tensor import Partial

            assert grads[1][0] == (str(Partial()),), grads[1][0]  # the weight's share per rank
