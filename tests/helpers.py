"""Shared test utilities: the accuracy rule of docs/design.md ("Accuracy rule"), and the device the
tests run on."""
from __future__ import annotations

import os

import torch

TEST_DEVICE = torch.device(os.environ.get("MEDITRON_TEST_DEVICE", "cpu"))
"""Where the tests' tensors live (tests/conftest.py: cpu, or cuda under MEDITRON_TEST_DEVICE=cuda)."""
ON_CUDA = TEST_DEVICE.type == "cuda"
MATRIX_DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if ON_CUDA else ())
"""The dtypes of the matrix kernels' (attention's) test matrix: bf16 only natively, because the
Triton interpreter's bf16 arithmetic is wrong (its tl.dot on raw bf16 gives garbage)."""

FP32_FLOOR_ULPS = 16
"""The fp32 floor of the rule's baseline, in fp32 ulps (2**-23) of max|ref|.

In fp32 the baseline ``max|out_torch - ref|`` measures the CPU's BLAS more than the op: torch's fp32
CPU matmuls accumulate in a kernel-specific blocked order, and the same test gave a dk baseline of
3.0e-6 on one x86 CPU and 4x less on another. A float64 emulation of attention's backward at
head_dim 256 (every stored value rounded to fp32, sums exact) errs by 1-5 ulps of max|dk|; the same
with the dot products summed term by term in fp32, as a loop over head_dim does, by 7-28 ulps; the
Triton kernel by 16-23, and torch's blocked BLAS by 2-8. A correct fp32 sum of K terms in order
carries about sqrt(K) ulps; 16 is sqrt(256), the longest such reduction in the op tests. So in fp32
the baseline is at least this floor, which holds on every CPU; fp16 and bf16 keep the measured
baseline alone (their own rounding dwarfs the floor, and the rule there stays exactly 2x/3x)."""


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def baseline_err(out_torch: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out_torch - ref|, floored in fp32 at FP32_FLOOR_ULPS ulps of max|ref| (machine-independent)."""
    base = max_err(out_torch, ref)
    if out_torch.dtype == torch.float32 and ref.numel():
        base = max(base, FP32_FLOOR_ULPS * torch.finfo(torch.float32).eps * ref.double().abs().max().item())
    return base


def assert_close_rule(out: torch.Tensor, out_torch: torch.Tensor, ref: torch.Tensor, factor: float = 2.0,
                      atol: float = 1e-6, name: str = "output") -> None:
    """max|out - ref| <= factor * max|out_torch - ref| + atol, where ref is the fp32/fp64
    reference and out_torch is plain PyTorch in out's dtype (in fp32 at least the floor above)."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    if out.numel() == 0:
        return
    err = max_err(out, ref)
    base = baseline_err(out_torch, ref)
    assert err <= factor * base + atol, f"{name}: error {err:.3e} > {factor} x torch error {base:.3e} + {atol:.0e}"


def assert_static_clean(rep: dict, vector_load_bits: int = 128) -> None:
    """One static-report record (meditron_kernels.static.report) of a memory-bound kernel: no
    spills or stack, shared memory within the part, at least one block per SM, and loads of
    ``vector_load_bits`` (16-byte aligned 16-bit rows are read 16 bytes at a time)."""
    assert rep["spill_bytes"] == 0 and rep["stack_bytes"] == 0, rep
    assert rep["shared_bytes"] <= rep["shared_limit"], rep
    assert rep["blocks_per_sm"] >= 1, rep
    assert rep["vector_load_bits"] == vector_load_bits, rep


# ---------------------------------------------------------------------------- trainer and tokenizer fixtures
def tiny_run_config(out_dir, steps: int, checkpoint_interval: int, decay_steps: int | None = None):
    """The default tiny model on the bundled corpus at 2 x 32 tokens per step, logging every step,
    no evaluation: a few seconds per run."""
    from train.config import Config

    cfg = Config()
    cfg.out_dir = str(out_dir)
    t = cfg.training
    t.steps, t.micro_batch, t.global_batch, t.seq_len, t.warmup_steps = steps, 2, 2, 32, 1
    if decay_steps is not None:
        t.decay_steps = decay_steps
    cfg.metrics.log_interval = 1
    cfg.checkpoint.interval = checkpoint_interval
    cfg.eval.interval = 0
    return cfg


def build_tokenizer_files(d, text: list[str], sp_vocab: int, bpe_vocab: int) -> dict[str, str]:
    """A sentencepiece .model and an HF tokenizer.json trained offline on ``text`` in folder ``d``
    (ids 0, 1, 2 = unk, bos, eos in both) -> {"sentencepiece": path, "hf": path}."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    (d / "train.txt").write_text("\n".join(text))
    # identity normalisation and byte fallback: decode(encode(s)) == s for any text
    spm.SentencePieceTrainer.train(input=str(d / "train.txt"), model_prefix=str(d / "sp"), vocab_size=sp_vocab,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, add_dummy_prefix=False, minloglevel=2)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=bpe_vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    bpe.save(str(d / "tokenizer.json"))
    return {"sentencepiece": str(d / "sp.model"), "hf": str(d / "tokenizer.json")}
