"""The op registry's public surface: which implementation a call would use, and why another cannot run."""
import pytest
import torch

import meditron_kernels as mk
from meditron_kernels import backend as B
from meditron_kernels import reference

CPU = torch.device("cpu")
PUBLIC_OPS = ("rms_norm", "apply_rotary", "swiglu", "swiglu_packed", "geglu", "geglu_packed", "xielu",
              "flash_attention", "cross_entropy", "fused_linear_cross_entropy")


def test_every_public_op_has_its_reference_registered():
    for op in PUBLIC_OPS:
        impls = B.implementations(op)
        assert "torch" in impls and callable(impls["torch"]), op
        assert set(impls) <= set(B.BACKENDS)
    assert B.implementations("rms_norm")["torch"] is reference.rms_norm
    assert B.implementations("no_such_op") == {}


def test_op_modules_are_imported_explicitly():
    # Every Triton op module and every cuda_* module registers on import of the package.
    for op in ("rms_norm", "apply_rotary", "swiglu", "swiglu_packed"):
        assert "cuda" in B.implementations(op), op
    if B.triton_available():
        for op in PUBLIC_OPS:
            assert "triton" in B.implementations(op), op


def test_choose_names_the_backend_and_agrees_with_dispatch(monkeypatch):
    monkeypatch.delenv(B.ENV_VAR, raising=False)
    assert B.choose("swiglu", CPU) == ("torch", None)
    assert B.dispatch("swiglu", None, CPU) is B.implementations("swiglu")["torch"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    name, why = B.choose("swiglu", "cpu", backend="triton")
    assert (name, why) == ("triton", None)
    assert B.dispatch("swiglu", "triton", CPU) is B.implementations("swiglu")["triton"]
    with mk.use_backend("cuda"):
        name, why = B.choose("swiglu", CPU)
    assert name == "cuda" and "needs CUDA tensors" in why


def test_unavailable_reason_is_the_error_dispatch_raises(monkeypatch):
    cases = [("cuda", {}, ValueError), ("triton", {"TRITON_INTERPRET": "0"}, ValueError)]
    for backend, env, error in cases:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        why = B.unavailable_reason("swiglu", backend, CPU)
        assert why and why.startswith("swiglu: ")
        with pytest.raises(error) as e:
            B.dispatch("swiglu", backend, CPU)
        assert str(e.value) == why
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert B.unavailable_reason("swiglu", "torch", CPU) is None
    assert B.unavailable_reason("swiglu", "triton", CPU) is None


def test_missing_implementation_reason(monkeypatch):
    monkeypatch.delitem(B._REGISTRY, ("swiglu", "triton"), raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "swiglu" not in {op for op in PUBLIC_OPS if "triton" in B.implementations(op)}
    why = B.unavailable_reason("swiglu", "triton", CPU)
    assert why == "swiglu has no 'triton' backend yet"
    with pytest.raises(NotImplementedError, match="has no 'triton' backend"):
        B.dispatch("swiglu", "triton", CPU)


def test_unavailable_reason_rejects_unknown_backend_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        B.unavailable_reason("swiglu", "cudnn", CPU)
