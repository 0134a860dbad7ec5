"""The model against transformers.LlamaForCausalLM with the same weights, in float32."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model import Llama, LlamaConfig  # noqa: E402
from model.hf import to_hf_name  # noqa: E402

CONFIGS = {
    "mha": dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=4,
                num_hidden_layers=2, vocab_size=101),
    "gqa": dict(hidden_size=96, intermediate_size=250, num_attention_heads=6, num_key_value_heads=2,
                num_hidden_layers=3, vocab_size=123),
    "mqa-odd": dict(hidden_size=80, intermediate_size=123, num_attention_heads=5, num_key_value_heads=1,
                    num_hidden_layers=2, vocab_size=77),
}


def _hf_model(kind, tmp_path):
    cfg = transformers.LlamaConfig(**CONFIGS[kind], max_position_embeddings=256, rms_norm_eps=1e-5,
                                   rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # transformers zero-inits nothing here, but make norms non-trivial
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    return hf


def _scale_close(a, b, rel):
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3e} > {rel:.0e} x scale {scale:.3e}"


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_logits_loss_and_grads_match_transformers(kind, tmp_path):
    hf = _hf_model(kind, tmp_path)
    ours = Llama.from_hf(tmp_path)
    vocab = CONFIGS[kind]["vocab_size"]
    tokens = torch.randint(0, vocab, (2, 37))
    ref = hf(tokens).logits
    out = ours(tokens)
    _scale_close(out, ref, 1e-4)

    targets = torch.randint(0, vocab, (2, 37))
    targets[0, :5] = -100
    hf_loss = torch.nn.functional.cross_entropy(ref.reshape(-1, vocab), targets.reshape(-1))
    loss = ours.loss(tokens, targets)
    assert abs(loss.item() - hf_loss.item()) <= 1e-5 * abs(hf_loss.item())
    loss.backward()
    hf_loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        g_ref = hf_params[to_hf_name(name)].grad
        _scale_close(p.grad, g_ref, 1e-4)


def test_save_hf_then_transformers_from_pretrained(tmp_path):
    torch.manual_seed(1)
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=99, ffn_dim=160, max_seq_len=128)
    ours = Llama(cfg).eval()
    ours.save_hf(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).float().eval()
    tokens = torch.randint(0, 99, (3, 20))
    _scale_close(ours(tokens), hf(tokens).logits, 1e-4)
    # and back again, exactly
    again = Llama.from_hf(tmp_path)
    assert torch.equal(again(tokens), ours(tokens))


def test_sharded_checkpoint_round_trip(tmp_path):
    cfg = LlamaConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=4, vocab_size=90, ffn_dim=128, max_seq_len=64)
    ours = Llama(cfg)
    ours.save_hf(tmp_path, max_shard_size=40_000)
    files = sorted(os.listdir(tmp_path))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert set(index["weight_map"].values()) == set(shards)
    loaded = Llama.from_hf(tmp_path)
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), loaded.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).float().eval()
    tokens = torch.randint(0, 90, (1, 11))
    _scale_close(loaded(tokens), hf(tokens).logits, 1e-4)
    # resaving unsharded removes the stale shards
    loaded.save_hf(tmp_path)
    assert sorted(f for f in os.listdir(tmp_path) if "safetensors" in f) == ["model.safetensors"]


def test_from_hf_loads_bf16_checkpoint_in_its_dtype(tmp_path):
    cfg = LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=50, ffn_dim=64, max_seq_len=32)
    Llama(cfg).save_hf(tmp_path, dtype=torch.bfloat16)
    m = Llama.from_hf(tmp_path)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m.rope_cos.dtype == torch.float32


def test_from_hf_rejects_unsupported_configs(tmp_path):
    cfg = LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=50, ffn_dim=64, max_seq_len=32)
    Llama(cfg).save_hf(tmp_path)
    conf = json.load(open(tmp_path / "config.json"))
    conf["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    del conf["rope_parameters"]
    json.dump(conf, open(tmp_path / "config.json", "w"))
    with pytest.raises(NotImplementedError, match="rope scaling 'dynamic'"):
        Llama.from_hf(tmp_path)
    del conf["rope_scaling"]
    json.dump(conf, open(tmp_path / "config.json", "w"))
    Llama.from_hf(tmp_path)  # old-style rope_theta key alone is fine
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Llama.from_hf(tmp_path)
