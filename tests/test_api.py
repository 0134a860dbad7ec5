"""The public API: contract names, backend dispatch and the errors bad input gets."""
import inspect

import pytest
import torch

import meditron_kernels as mk
from meditron_kernels import backend as B


def test_contract_names_exist():
    for name in ("rms_norm", "rotary_cos_sin", "apply_rotary", "swiglu", "flash_attention", "cross_entropy",
                 "fused_linear_cross_entropy", "geglu", "geglu_packed", "xielu"):
        assert callable(getattr(mk, name))


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(B.ENV_VAR, raising=False)
    assert B.resolve(None, cpu) == "torch"
    assert B.resolve("triton", cpu) == "triton"
    monkeypatch.setenv(B.ENV_VAR, "cuda")
    assert B.resolve(None, cpu) == "cuda"
    with mk.use_backend("torch"):
        assert B.resolve(None, cpu) == "torch"
        assert B.resolve("triton", cpu) == "triton"
    monkeypatch.setenv(B.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=B.ENV_VAR):
        B.resolve(None, cpu)
    with pytest.raises(ValueError, match="backend"):
        mk.swiglu(torch.randn(3), torch.randn(3), backend="cudnn")


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA tensors"):
        mk.swiglu(torch.randn(3), torch.randn(3), backend="cuda")


def test_missing_backend_names_op_and_backend(monkeypatch):
    monkeypatch.delitem(B._REGISTRY, ("swiglu", "triton"), raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(NotImplementedError, match="swiglu.*'triton'"):
        mk.swiglu(torch.randn(3), torch.randn(3), backend="triton")


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        mk.swiglu(torch.randn(3), torch.randn(3), backend="triton")


# ----------------------------------------------------------------- bad inputs, per op
def test_rms_norm_errors():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ValueError, match="weight has 7 elements but x has hidden size 8"):
        mk.rms_norm(x, torch.randn(7))
    with pytest.raises(ValueError, match="weight must be 1-D"):
        mk.rms_norm(x, torch.randn(1, 8))
    with pytest.raises(TypeError, match="x must be a float"):
        mk.rms_norm(x.long(), w)
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        mk.rms_norm(x.half(), w.bfloat16())
    with pytest.raises(ValueError, match="residual has shape"):
        mk.rms_norm(x, w, residual=torch.randn(4, 9))
    with pytest.raises(TypeError, match="residual has dtype"):
        mk.rms_norm(x, w, residual=x.half())
    with pytest.raises(ValueError, match="eps"):
        mk.rms_norm(x, w, eps=-1.0)
    with pytest.raises(ValueError, match="same device"):
        mk.rms_norm(x, w.to("meta"))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        mk.rms_norm([1.0, 2.0], w)


def test_rotary_errors():
    q, k = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    cos, sin = mk.rotary_cos_sin(16, 8)
    with pytest.raises(ValueError, match="head_dim must be even"):
        mk.rotary_cos_sin(16, 7)
    with pytest.raises(ValueError, match="head_dim must be even"):
        mk.apply_rotary(q[..., :7], k[..., :7], cos[:, :3], sin[:, :3])
    with pytest.raises(ValueError, match="q must be 4-D"):
        mk.apply_rotary(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="share \\(batch, seq\\)"):
        mk.apply_rotary(q, k[:, :4], cos, sin)
    with pytest.raises(ValueError, match="cos must have head_dim // 2 = 4 columns"):
        mk.apply_rotary(q, k, cos[:, :3], sin[:, :3])
    with pytest.raises(ValueError, match="cover 3 positions but seq is 5"):
        mk.apply_rotary(q, k, cos[:3], sin[:3])
    with pytest.raises(ValueError, match="position_ids must have shape"):
        mk.apply_rotary(q, k, cos, sin, position_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="position_ids must be an int32 or int64"):
        mk.apply_rotary(q, k, cos, sin, position_ids=torch.zeros(2, 5))
    with pytest.raises(TypeError, match="k has dtype"):
        mk.apply_rotary(q, k.half(), cos, sin)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        mk.rotary_cos_sin(0, 8)


def test_swiglu_errors():
    with pytest.raises(ValueError, match="gate has shape"):
        mk.swiglu(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(TypeError, match="up has dtype"):
        mk.swiglu(torch.randn(3), torch.randn(3).half())
    with pytest.raises(ValueError, match="must be even"):
        mk.swiglu_packed(torch.randn(3, 5))


def test_attention_errors():
    q, k, v = torch.randn(2, 6, 4, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    with pytest.raises(ValueError, match="n_heads \\(4\\) must be divisible by n_kv_heads \\(3\\)"):
        mk.flash_attention(q, torch.randn(2, 6, 3, 8), torch.randn(2, 6, 3, 8))
    with pytest.raises(ValueError, match="q and k must share head_dim"):
        mk.flash_attention(q, k[..., :4], v[..., :4])
    with pytest.raises(ValueError, match="q must be 4-D"):
        mk.flash_attention(q[0], k, v)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        mk.flash_attention(q, k, v[:, :, :1])
    with pytest.raises(TypeError, match="v has dtype"):
        mk.flash_attention(q, k, v.half())
    with pytest.raises(ValueError, match="head_dim must be even for rotary"):
        cos, sin = mk.rotary_cos_sin(8, 8)
        mk.flash_attention(q[..., :7], k[..., :7], v[..., :7], rotary=(cos[:, :3], sin[:, :3]))
    with pytest.raises(ValueError, match="position_ids is only used with rotary"):
        mk.flash_attention(q, k, v, position_ids=torch.zeros(2, 6, dtype=torch.long))


def test_attention_window_errors():
    q, k, v = torch.randn(2, 6, 4, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    for bad in ((3,), (-2, 0), (1.5, 0), "left", (True, 0)):
        with pytest.raises(ValueError, match="window must be a \\(left, right\\) pair"):
            mk.flash_attention(q, k, v, window=bad)
    # (-1, -1) is global attention, as in FlashAttention
    assert torch.equal(mk.flash_attention(q, k, v, window=(-1, -1)), mk.flash_attention(q, k, v))
    impl = B.implementations("flash_attention").get("triton")
    if impl is not None and "window" not in inspect.signature(impl).parameters:
        with pytest.raises(NotImplementedError, match="window=\\(3, 0\\).*'triton' backend"):
            mk.flash_attention(q, k, v, window=(3, 0), backend="triton")


def test_packed_attention_errors():
    q, k, v = torch.randn(10, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    with pytest.raises(TypeError, match="cu_seqlens must be int32"):
        mk.flash_attention(q, k, v, cu_seqlens=torch.tensor([0, 4, 10]), max_seqlen=6)
    with pytest.raises(ValueError, match="non-decreasing"):
        mk.flash_attention(q, k, v, cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32), max_seqlen=6)
    with pytest.raises(ValueError, match="start at 0"):
        mk.flash_attention(q, k, v, cu_seqlens=torch.tensor([1, 4, 10], dtype=torch.int32), max_seqlen=6)
    with pytest.raises(ValueError, match="end at the number of tokens in q \\(10\\)"):
        mk.flash_attention(q, k, v, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32), max_seqlen=6)
    with pytest.raises(ValueError, match="max_seqlen=5 is smaller than the longest document \\(6 tokens\\)"):
        mk.flash_attention(q, k, v, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32), max_seqlen=5)
    with pytest.raises(ValueError, match="3-D"):
        mk.flash_attention(q[None], k[None], v[None], cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))
    # the same tensor mutated after a successful check is checked again
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    mk.flash_attention(q, k, v, cu_seqlens=cu, max_seqlen=6)
    cu[1] = 11
    with pytest.raises(ValueError, match="non-decreasing"):
        mk.flash_attention(q, k, v, cu_seqlens=cu, max_seqlen=6)


def test_cross_entropy_errors():
    logits = torch.randn(4, 7, 11)
    with pytest.raises(ValueError, match="targets must have shape \\(4, 7\\)"):
        mk.cross_entropy(logits, torch.zeros(4, 6, dtype=torch.long))
    with pytest.raises(TypeError, match="targets must be an int32 or int64"):
        mk.cross_entropy(logits, torch.zeros(4, 7))
    h, w = torch.randn(5, 8), torch.randn(11, 8)
    with pytest.raises(ValueError, match="lm_head_weight has dim 7 but hidden has 8"):
        mk.fused_linear_cross_entropy(h, torch.randn(11, 7), torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="lm_head_weight has dtype"):
        mk.fused_linear_cross_entropy(h, w.half(), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        mk.fused_linear_cross_entropy(h, w, torch.zeros(5, dtype=torch.long), chunk_size=0)
