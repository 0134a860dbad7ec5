"""Checks a built meditron_kernels._C without a GPU: the library loads beside the Triton ops'
custom_op fragments of the same namespace (in both orders), every op schema is registered, and
the Python side (fake kernels, autograd) works on meta tensors: opcheck and
torch.compile(fullgraph=True).

    python scripts/check_cuda_ext.py PATH/TO/_C.*.so

Run by scripts/build_cuda_ext_check.sh. Needs a CUDA build of torch; no GPU.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ["cuda_rms_norm_fwd", "cuda_rms_norm_residual_fwd", "cuda_rms_norm_bwd", "cuda_apply_rotary",
       "cuda_swiglu_fwd", "cuda_swiglu_bwd", "cuda_swiglu_packed_fwd", "cuda_swiglu_packed_bwd"]


def fragment_then_library(pkg_dir: str) -> None:
    """A Triton-style custom_op fragment first, then the extension: both must register."""
    @torch.library.custom_op("meditron_kernels::triton_probe", mutates_args=())
    def probe(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    sys.path.insert(0, pkg_dir)
    import meditron_kernels  # noqa: F401  (ops/cuda_*.py load _C and register fakes/autograd)
    from meditron_kernels import _cuda_ext

    assert _cuda_ext.loaded(), _cuda_ext.why_unavailable()
    for name in OPS:
        print("  ", torch.ops.meditron_kernels.__getattr__(name).default._schema)
    assert torch.ops.meditron_kernels.triton_probe(torch.ones(2)).sum().item() == 2
    print("ok: custom_op fragment, then TORCH_LIBRARY: both registered")


def library_then_fragment(pkg_dir: str) -> None:
    code = f"""
import sys, torch
sys.path.insert(0, {pkg_dir!r})
import meditron_kernels._C
@torch.library.custom_op("meditron_kernels::triton_probe", mutates_args=())
def probe(x: torch.Tensor) -> torch.Tensor:
    return x.clone()
torch.ops.meditron_kernels.cuda_swiglu_fwd
assert torch.ops.meditron_kernels.triton_probe(torch.ones(2)).sum().item() == 2
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    print("ok: TORCH_LIBRARY, then custom_op fragment: both registered")


def meta_checks() -> None:
    from torch.library import opcheck

    from meditron_kernels import _cuda_ext, backend

    cases = _cuda_ext.opcheck_cases("meta")
    for op, args in cases:
        opcheck(op, args)
    print(f"ok: opcheck on meta tensors, {len(cases)} cases")
    x, r, w, _ = cases[1][1]  # the inputs of the rms_norm, rotary and packed swiglu cases
    q, k, cos, sin, *_ = cases[4][1]
    (gu,) = cases[8][1]

    # The registered implementations themselves: dispatch would refuse meta tensors.
    rms_norm, apply_rotary, swiglu_packed = (backend.implementations(op)["cuda"]
                                             for op in ("rms_norm", "apply_rotary", "swiglu_packed"))

    def block(x, r, w, q, k, gu):
        y, h = rms_norm(x, w, 1e-5, r)
        q2, k2 = apply_rotary(q, k, cos, sin, None, False)
        a = swiglu_packed(gu)
        return y.float().sum() + h.float().sum() + q2.float().sum() + k2.float().sum() + a.sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    loss = compiled(x, r, w, q, k, gu)
    loss.backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and w.grad.dtype == torch.float32
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and gu.grad.shape == gu.shape
    print("ok: torch.compile(fullgraph=True, backend='aot_eager') forward and backward on meta tensors")


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    so = os.path.abspath(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        # A copy of the package with the library inside, so that `import meditron_kernels._C` works
        # without installing anything or leaving a foreign .so in the source tree.
        shutil.copytree(os.path.join(ROOT, "meditron_kernels"), os.path.join(tmp, "meditron_kernels"),
                        ignore=shutil.ignore_patterns("__pycache__", "_C*.so"))
        shutil.copy(so, os.path.join(tmp, "meditron_kernels"))
        library_then_fragment(tmp)
        fragment_then_library(tmp)
        meta_checks()


if __name__ == "__main__":
    main()
