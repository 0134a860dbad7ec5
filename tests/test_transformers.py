"""meditron_kernels.transformers: patched transformers models against the unpatched ones.

Tiny models built from configs. The accuracy rule (docs/design.md, "Accuracy rule") at model level: the
patched fp32 model's error against the unpatched model in float64 is at most 2x (3x for
gradients) the unpatched fp32 model's own error, plus a tiny atol.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import meditron_kernels as mk  # noqa: E402
import meditron_kernels.transformers as mkt  # noqa: E402
from tests.helpers import assert_close_rule  # noqa: E402

VOCAB = 61
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
ARCHS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),  # q/k/v bias
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=8),  # per-head q/k norms
}


def _model(arch, dtype=torch.float32, **config):
    cfg = ARCHS[arch]()
    for k, v in config.items():
        setattr(cfg, k, v)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(dtype)
    if arch == "qwen2":  # make the (zero-initialised) biases matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    if arch == "qwen3":
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:  # norm weights: away from their all-ones init
                    p.uniform_(0.5, 1.5)
    return model


def _padded_batch():
    ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0  # right padding
    mask[1, :3] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _packed_batch(flash_kwargs=False):
    # Three documents in one row, positions restarting at 0 (padding-free training).
    # use_cache=False: with a cache object (config.use_cache, the default), transformers' sdpa/eager
    # masks ignore packed position_ids and attend across documents; the patched model never does.
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    docs = [{"input_ids": torch.randint(0, VOCAB, (n,)).tolist()} for n in (4, 3, 5)]
    return dict(collator(docs, return_tensors="pt"), use_cache=False)


def _loss64(logits, labels, num_items=None):
    # transformers' causal-LM loss in float64 (its own upcasts logits to float32)
    target = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target, ignore_index=-100,
                                             reduction="sum" if num_items is not None else "mean")
    return loss / num_items if num_items is not None else loss


def _run(model, batch, backend=None):
    """(loss, {name: grad}) in training mode, then the logits in eval mode. A float64 model's loss
    is computed in float64 here."""
    model.train()
    model.zero_grad(set_to_none=True)
    with mk.use_backend(backend):
        if next(model.parameters()).dtype == torch.float64:
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_items_in_batch")}
            out = model(**inputs)
            out.loss = _loss64(out.logits, batch["labels"], batch.get("num_items_in_batch"))
            out.logits = None
        else:
            out = model(**batch)
        out.loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.eval()
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "num_items_in_batch")}).logits
    return out.loss.detach(), grads, logits, out.logits


def _check(arch, batch, backend, real=None):
    ref = _model(arch)
    pat = mkt.apply(copy.deepcopy(ref))
    exact = copy.deepcopy(ref).double()
    ours = _run(pat, batch, backend)
    plain = _run(ref, batch)
    truth = _run(exact, batch)
    assert ours[3] is None and plain[3] is not None, "training with labels must not materialise the logits"
    assert_close_rule(ours[0], plain[0], truth[0], name="loss")
    keep = (lambda t: t[real]) if real is not None else (lambda t: t)
    assert_close_rule(keep(ours[2]), keep(plain[2]), keep(truth[2]), name="logits")
    assert ours[1].keys() == truth[1].keys()
    for name in truth[1]:
        assert_close_rule(ours[1][name], plain[1][name], truth[1][name], factor=3.0, name=f"grad {name}")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_padding_packing_and_num_items_match_unpatched(arch, backend):
    _check(arch, _packed_batch(), backend)
    # Left and right padding, with the Trainer's num_items_in_batch: the loss is the sum over this
    # micro-batch divided by the number of tokens of the whole step. The torch backend also runs
    # the plain mean.
    batch = _padded_batch()
    if backend == "torch":
        _check(arch, batch, backend, real=batch["attention_mask"].bool())
    batch["num_items_in_batch"] = torch.tensor(23)
    _check(arch, batch, backend, real=batch["attention_mask"].bool())


def test_flash_attention_kwargs_and_positions_give_the_same_documents():
    torch.manual_seed(0)
    a = _packed_batch(flash_kwargs=True)
    torch.manual_seed(0)
    b = _packed_batch()
    assert "cu_seq_lens_q" in a and torch.equal(a["input_ids"], b["input_ids"])
    model = mkt.apply(_model("llama"))
    la, ga, *_ = _run(model, a)
    lb, gb, *_ = _run(model, b)
    assert torch.equal(la, lb)
    assert all(torch.equal(ga[n], gb[n]) for n in ga)


def test_only_this_instance_is_patched():
    ref = _model("llama")
    other = copy.deepcopy(ref)
    layer_cls = type(ref.model.layers[0])
    mkt.apply(ref)
    assert type(other.model.layers[0]) is layer_cls and "forward" not in vars(other)
    assert "forward" not in vars(other.model.layers[0].self_attn)
    assert type(ref.model.layers[0]) is not layer_cls and isinstance(ref.model.layers[0], layer_cls)
    assert type(ref.model.layers[0]).__name__ == layer_cls.__name__
    batch = _padded_batch()
    other.train()
    assert other(**batch).logits is not None  # still transformers' forward


def test_trainer_with_gradient_accumulation_matches_unpatched(tmp_path):
    # Variable-length sequences, padded per micro-batch; 2 micro-batches per step, so the Trainer
    # passes num_items_in_batch and the loss of each step averages over all its tokens.
    torch.manual_seed(1)
    data = [{"input_ids": torch.randint(0, VOCAB, (int(n),)).tolist()} for n in torch.randint(3, 10, (12,))]

    def collate(rows):
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.zeros(len(rows), n, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))

    def train(model):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
            learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
            remove_unused_columns=False, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    ref = _model("llama")
    pat = mkt.apply(copy.deepcopy(ref))
    expect, got = train(ref), train(pat)
    assert len(expect) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expect), rtol=1e-5, atol=1e-6)


def test_trl_sft_trainer_matches_unpatched(tmp_path):
    # TRL computes the loss with its own fused LM head over the (patched) backbone; padded batches
    # and packing (padding-free position_ids) both follow the unpatched model's loss curve.
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models

    torch.manual_seed(1)
    rows = [{"input_ids": torch.randint(1, VOCAB, (int(n),)).tolist()} for n in torch.randint(3, 10, (8,))]
    vocab = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="t0", eos_token="t0", unk_token="t1")

    def train(model, packing):
        args = trl.SFTConfig(
            output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
            learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
            bf16=False, packing=packing, max_length=16 if packing else None, disable_tqdm=True)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tok)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    ref = _model("llama", pad_token_id=0, eos_token_id=0)
    pat = mkt.apply(copy.deepcopy(ref))
    for packing in (False, True):
        expect, got = train(copy.deepcopy(ref), packing), train(copy.deepcopy(pat), packing)
        assert len(expect) == 2
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expect), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_patched_model_pickles_and_deep_copies_patched(arch):
    import io
    import pickle

    pat = mkt.apply(_model(arch))
    buf = io.BytesIO()
    torch.save(pat, buf)  # whole-module pickling, as the unpatched model allows
    buf.seek(0)
    copies = [torch.load(buf, weights_only=False), pickle.loads(pickle.dumps(pat)), copy.deepcopy(pat)]
    batch = _padded_batch()
    want = _run(pat, batch)
    for other in copies:
        assert other._meditron_kernels == pat._meditron_kernels
        layer = other.model.layers[0]
        assert type(layer) is type(pat.model.layers[0]) and layer._meditron_opts == pat.model.layers[0]._meditron_opts
        assert vars(layer.self_attn)["forward"].module is layer.self_attn  # bound to the copy, not the original
        got = _run(other, batch)
        assert got[3] is None  # still the fused loss: the copy is patched
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
        assert all(torch.equal(got[1][n], want[1][n]) for n in want[1])


def test_gradient_checkpointing_still_applies():
    ref = mkt.apply(_model("qwen3"))
    ckpt = copy.deepcopy(ref)  # a copy of a patched model is patched
    assert ckpt.model.layers[0]._meditron_opts is not None
    ckpt.gradient_checkpointing_enable()
    layer = ckpt.model.layers[0]
    calls, checkpoint = [], layer._gradient_checkpointing_func
    layer._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or checkpoint(*a, **k)
    batch = _packed_batch()
    la, ga, *_ = _run(ref, batch)
    lb, gb, *_ = _run(ckpt, batch)
    assert calls == [1]  # the training forward ran through the checkpoint
    assert torch.equal(la, lb) and all(torch.allclose(ga[n], gb[n], atol=1e-7) for n in ga)


def test_lora_adapters_apply():
    peft = pytest.importorskip("peft")
    ref = _model("llama")
    pat = mkt.apply(copy.deepcopy(ref))
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(3)
    ref = peft.get_peft_model(ref, peft.LoraConfig(**lora))
    torch.manual_seed(3)
    pat = peft.get_peft_model(pat, peft.LoraConfig(**lora))
    batch = _padded_batch()
    lr, gr, *_ = _run(ref, batch)
    lp, gp, *_ = _run(pat, batch)
    assert gr.keys() == gp.keys() and all("lora_" in n for n in gp)
    torch.testing.assert_close(lp, lr, rtol=1e-5, atol=1e-6)
    for n in gr:
        torch.testing.assert_close(gp[n], gr[n], rtol=1e-4, atol=1e-6)
    # Patching a PEFT model patches its base model.
    torch.manual_seed(3)
    late = mkt.apply(peft.get_peft_model(_model("llama"), peft.LoraConfig(**lora)))
    assert late.get_base_model()._meditron_kernels is not None


def test_generate_with_cache_falls_back_correctly():
    ref = _model("llama")
    pat = mkt.apply(copy.deepcopy(ref))
    ids = torch.randint(1, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding, as for generation
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(pat.generate(ids, **kw), ref.generate(ids, **kw))


def test_attn_implementation_meditron_without_apply():
    ref = _model("mistral")
    med = copy.deepcopy(ref)
    med.set_attn_implementation("meditron")
    batch = _padded_batch()
    real = batch["attention_mask"].bool()
    for m in (ref, med):
        m.eval()
    with torch.no_grad():
        a = ref(**batch).logits
        b = med(**batch).logits
        torch.testing.assert_close(b[real], a[real], rtol=1e-4, atol=1e-5)
        p = _packed_batch()
        torch.testing.assert_close(med(**p).logits, ref(**p).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend,padded", [("torch", False), ("triton", True)])
def test_compile_fullgraph(backend, padded):
    # aot_eager traces forward and backward with dynamo and AOTAutograd (a graph break would raise
    # under fullgraph=True) without inductor's code generation, which takes minutes on 2 cores.
    torch._dynamo.reset()
    model = mkt.apply(_model("qwen3"))
    batch = _padded_batch() if padded else _packed_batch()
    eager = _run(model, batch, backend)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.train()
    model.zero_grad(set_to_none=True)
    with mk.use_backend(backend):
        loss = compiled(**batch).loss
        loss.backward()
    torch.testing.assert_close(loss.detach(), eager[0], rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[1][n], rtol=1e-5, atol=1e-6)


def test_errors():
    with pytest.raises(TypeError, match=r"supports LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
                                        r"Qwen3ForCausalLM .* got Linear"):
        mkt.apply(torch.nn.Linear(2, 2))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=10))
    with pytest.raises(TypeError, match="got GPT2LMHeadModel"):
        mkt.apply(gpt2)
    with pytest.raises(TypeError, match="rotary must be a bool"):
        mkt.apply(_model("llama"), rotary=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        mkt.apply(_model("llama"), backend="cudnn")
    model = mkt.apply(_model("llama"))
    with pytest.raises(ValueError, match="already patched"):
        mkt.apply(model)
    with pytest.raises(ValueError, match="attention_dropout=0.1"):
        mkt.apply(_model("llama", attention_dropout=0.1))
    with pytest.raises(ValueError, match="hidden_act 'silu'.*'gelu'"):
        mkt.apply(_model("llama", hidden_act="gelu"))
    mkt.apply(_model("llama", hidden_act="gelu"), swiglu=False)  # the other ops still apply
    window = mkt.apply(_model("mistral", sliding_window=4))
    with pytest.raises(ValueError, match="sliding_window=4.*9 tokens"):
        window(**_padded_batch())
    with pytest.raises(ValueError, match="2-D .* padding attention_mask"):
        model(input_ids=torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 1, 3, 3))


def test_packing_ops():
    # The data-dependent index ops behind unpadding and padding-free packing (custom ops, so that
    # torch.compile traces them with an unbacked size instead of breaking the graph).
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    assert mkt._token_index(mask).tolist() == [0, 1, 4, 5]
    pos = torch.tensor([[0, 1, 2, 0, 1], [5, 6, 0, 1, 9]])
    assert mkt._document_offsets(pos).tolist() == [0, 3, 5, 7, 9, 10]
    torch.library.opcheck(torch.ops.meditron_kernels.hf_token_index.default, (mask,))
    torch.library.opcheck(torch.ops.meditron_kernels.hf_document_offsets.default, (pos,))
