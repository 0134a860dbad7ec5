"""Evaluation on Meditron's benchmarks (MedQA, MedMCQA, PubMedQA, MMLU-medical): python -m train.evaluate.

tasks: the benchmarks' local files; prompts: k-shot prompts; scoring: packed log-likelihoods,
generation, answer extraction and majority vote; runner: a task over seeds, data-parallel under
torchrun; load: a checkpoint and its tokenizer; lm_eval_adapter: the model as an
lm-evaluation-harness LM named "meditron". See docs/evaluate.md.
"""
