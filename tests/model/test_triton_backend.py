"""The model on the Triton kernels (under the interpreter on the CPU): parity with
transformers at the same tolerances as the torch backend, and a whole block under
torch.compile(fullgraph=True)."""
import pytest
import torch

import meditron_kernels as mk
from meditron_kernels import backend as B
from model import Llama, LlamaConfig, TransformerBlock
from model.hf import to_hf_name

transformers = pytest.importorskip("transformers")

OPS = ("rms_norm", "flash_attention", "swiglu", "fused_linear_cross_entropy")
pytestmark = pytest.mark.skipif(any((op, "triton") not in B._REGISTRY for op in OPS),
                                reason="a Triton op the model uses is not registered")


def _scale_close(a, b, rel):
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3e} > {rel:.0e} x scale {scale:.3e}"


def test_triton_model_matches_transformers(tmp_path):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=120, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=2, vocab_size=97, max_position_embeddings=64, rms_norm_eps=1e-5,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).float().eval()
    hf.save_pretrained(tmp_path)
    ours = Llama.from_hf(tmp_path)
    tokens = torch.randint(0, 97, (2, 37))
    targets = torch.randint(0, 97, (2, 37))
    targets[1, :4] = -100
    ref = hf(tokens).logits
    ref_loss = torch.nn.functional.cross_entropy(ref.reshape(-1, 97), targets.reshape(-1))
    ref_loss.backward()
    with mk.use_backend("triton"):
        _scale_close(ours(tokens), ref.detach(), 1e-4)
        loss = ours.loss(tokens, targets)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        _scale_close(p.grad, hf_params[to_hf_name(name)].grad, 1e-4)


def test_block_compiles_fullgraph_and_matches_eager():
    cfg = LlamaConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=50, ffn_dim=96, max_seq_len=64)
    torch.manual_seed(0)
    block = TransformerBlock(cfg, 0)
    for p in block.parameters():  # norms away from 1 so every op matters
        torch.nn.init.normal_(p, std=0.1 if p.dim() > 1 else 1.0)
    rope = mk.rotary_cos_sin(64, cfg.head_dim)
    x = torch.randn(2, 19, 64, requires_grad=True)
    cu = torch.tensor([0, 7, 19, 38], dtype=torch.int32)

    def step(x):
        packed = block(x, rope=rope, cu_seqlens=cu, max_seqlen=19)
        plain = block(x, rope=rope)
        return packed, plain

    with mk.use_backend("triton"):
        eager = step(x)
        compiled = torch.compile(step, fullgraph=True)(x)
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        g_eager = torch.autograd.grad(sum(o.square().sum() for o in eager), [x, *block.parameters()])
        g_comp = torch.autograd.grad(sum(o.square().sum() for o in compiled), [x, *block.parameters()])
    for a, b in zip(g_eager, g_comp):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
