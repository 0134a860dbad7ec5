"""Published training runs, each described by its own published layout only, and the table of
predictions against them (`python -m train.plan --validate`)."""
from __future__ import annotations

from dataclasses import dataclass

from train.metrics import mfu

from .hardware import GPUS, Cluster
from .layout import PlanLayout
from .step import Prediction, predict_layout
from .shapes import ARCHITECTURES


@dataclass(frozen=True)
class PublishedRun:
    """A training run with published throughput, described by its own published layout only."""

    name: str
    source: str
    model: str
    gpu: str
    nodes: int
    layout: PlanLayout
    published: str          # the figure as the source states it
    tokens_per_s: float     # the same figure, converted to tokens/s
    note: str = ""

    def predict(self) -> Prediction:
        return predict_layout(ARCHITECTURES[self.model], Cluster(GPUS[self.gpu], self.nodes, 8), self.layout)


def megatron_tflops_to_tokens_per_s(model: str, n_gpus: int, tflops_per_gpu: float) -> float:
    """Narayanan et al. 2021 count F = 96 B s l h^2 (1 + s/6h + V/16lh) FLOPs per step (their
    eq. 3, full recomputation included): B s tokens take F / (n X) seconds."""
    a = ARCHITECTURES[model]
    s, l, h, vocab = a.max_seq_len, a.n_layers, a.dim, a.vocab_size
    flops_per_token = 96 * l * h * h * (1 + s / (6 * h) + vocab / (16 * l * h))
    return n_gpus * tflops_per_gpu * 1e12 / flops_per_token


def _published_runs() -> list[PublishedRun]:
    runs = [PublishedRun(
        "Meditron-70B", "Chen et al. 2023 (arXiv 2311.16079), Megatron-LLM", "meditron-70b", "A100-80", 16,
        # Megatron-LLM's documented Llama-2 flags (docs/guide/faq.md, examples/finetune.sh):
        # --use_flash_attn --sequence_parallel --recompute_granularity selective, no distributed
        # optimizer; its Llama ops are Meta's reference code (fused_kernels=False).
        PlanLayout(tp=8, pp=8, dp=2, micro_batch=2, global_batch=512, seq_len=4096, recompute="selective",
               flash_attention=True, sequence_parallel=True, distributed_optimizer=False, fused_kernels=False),
        "40,200 tokens/s (42.3% MFU, 6 x 70e9 per token)", 40200.0)]

    # Korthikanti et al. 2022, Tables 3 and 5 ("present work": sequence parallelism + selective
    # recomputation, data parallel size 1), also the MFU table of the Megatron-LM README.
    for model, nodes, pp, gbs, mb, step, mfu_pub in (
            ("gpt-22b", 1, 1, 4, 4, 1.10, 41.5), ("gpt3-175b", 8, 8, 64, 1, 13.75, 51.4),
            ("gpt-530b", 35, 35, 280, 1, 37.83, 56.0), ("gpt-1t", 64, 64, 512, 1, 71.49, 56.3)):
        runs.append(PublishedRun(
            f"{model} (SP + selective)", "Korthikanti et al. 2022 (arXiv 2205.05198) Tables 3, 5; Megatron-LM README",
            model, "A100-80", nodes,
            PlanLayout(tp=8, pp=pp, dp=1, micro_batch=mb, global_batch=gbs, seq_len=2048, recompute="selective",
                   flash_attention=False, sequence_parallel=True, distributed_optimizer=False),
            f"{step} s/iteration ({mfu_pub}% MFU)", gbs * 2048 / step))

    # Narayanan et al. 2021 Table 1 (weak scaling, full recomputation, fp16). Micro-batch sizes,
    # interleaving and DDP flavour from the paper's own launch script, examples/sc21/run_table_1.sh
    # in Megatron-LM: torch DDP (overlapped all-reduce) up to 18B, Megatron's local DDP beyond.
    table1 = (  # model, tp, pp, GPUs, batch, micro-batch, model chunks per rank, TFLOP/s per GPU
        ("gpt-1.7b", 1, 1, 32, 512, 16, 1, 137), ("gpt-3.6b", 2, 1, 64, 512, 16, 1, 138),
        ("gpt-7.5b", 4, 1, 128, 512, 16, 1, 142), ("gpt-18b", 8, 1, 256, 1024, 8, 1, 135),
        ("gpt-39b", 8, 2, 512, 1536, 4, 1, 138), ("gpt-76b", 8, 4, 1024, 1792, 2, 3, 140),
        ("gpt-145b", 8, 8, 1536, 2304, 2, 2, 148), ("gpt-310b", 8, 16, 1920, 2160, 1, 2, 155),
        ("gpt-530b", 8, 35, 2520, 2520, 1, 3, 163), ("gpt-1t", 8, 64, 3072, 3072, 1, 1, 163))
    for model, t, p, n, gbs, mb, v, tflops in table1:
        runs.append(PublishedRun(
            f"{model} (Table 1)", "Narayanan et al. 2021 (arXiv 2104.04473) Table 1", model, "A100-80", n // 8,
            PlanLayout(tp=t, pp=p, dp=n // (t * p), micro_batch=mb, global_batch=gbs, seq_len=2048, recompute="full",
                   flash_attention=False, sequence_parallel=False, distributed_optimizer=False,
                   virtual_stages=v, grad_bytes=2, overlap="tp+dp" if p == 1 else "tp"),
            f"{tflops} TFLOP/s per GPU", megatron_tflops_to_tokens_per_s(model, n, tflops)))
    return runs


PUBLISHED_RUNS: list[PublishedRun] = _published_runs()


def validation_table(markdown: bool = False) -> str:
    """Every published run: its figure, the prediction, and both as MFU under 6 N_total."""
    rows = []
    for run in PUBLISHED_RUNS:
        pred = run.predict()
        L = run.layout
        chunks = f"x{L.virtual_stages}" if L.virtual_stages > 1 else ""
        layout = f"TP{L.tp} PP{L.pp}{chunks} DP{L.dp} mb{L.micro_batch} gbs{L.global_batch} {L.recompute}"
        flops = ARCHITECTURES[run.model].paper_flops_per_token()
        published_mfu = mfu(flops, run.tokens_per_s, run.nodes * 8, GPUS[run.gpu].peak_flops)
        rows.append((run.name, f"{run.nodes * 8} x {run.gpu}", layout, run.published,
                     f"{run.tokens_per_s:,.0f}", f"{pred.tokens_per_s:,.0f}",
                     f"{pred.tokens_per_s / run.tokens_per_s - 1:+.1%}",
                     f"{published_mfu:.1%}", f"{pred.mfu:.1%}", f"{pred.memory_gb_per_gpu:.0f}", run.source))
    head = ("run", "GPUs", "layout", "published", "tokens/s published", "tokens/s predicted", "error",
            "MFU published", "MFU predicted", "GiB/GPU", "source")
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    rows = [r[:-1] for r in rows]  # sources are in docs/plan.md and PUBLISHED_RUNS
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [head[:-1], *rows])
