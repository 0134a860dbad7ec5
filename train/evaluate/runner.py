"""Scoring the questions of a task for every seed, in one process or as one rank of torchrun.

The questions of a seed are cut into batches by a plan that depends on the questions alone;
rank r of a world of w processes scores batches r, r + w, ... and rank 0 gathers the rows. Each
batch is computed the same way whatever the world size (same sequences in the same forward,
same sampling seed), so the results equal a single process's.
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.distributed as dist

from ..process_group import init_process_group
from . import prompts as P
from .scoring import encode_pair, extract_answer, generate, loglikelihood_tokens, majority_vote, plan_batches
from .tasks import TaskData


@dataclasses.dataclass
class Settings:
    shots: int = 0
    seeds: tuple[int, ...] = (1234,)
    method: str = "loglikelihood"      # "loglikelihood" or "generate"
    samples: int = 1                   # > 1: self-consistency, majority vote over this many samples
    chain_of_thought: bool = False     # generation: explanations before answers, where the task has them
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int | None = None  # None: 16 for a direct answer, 256 with chain of thought
    batch_tokens: int = 8192           # log-likelihood: tokens per packed forward
    batch_sequences: int = 32          # generation: sequences per generate call

    @property
    def method_name(self) -> str:
        if self.method == "loglikelihood":
            return "loglikelihood"
        if self.samples > 1:
            return f"self-consistency (majority of {self.samples} samples, temperature {self.temperature})"
        return "generation (greedy)" if self.temperature == 0 else f"generation (temperature {self.temperature})"


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _batch_seed(seed: int, batch: int) -> int:
    return (seed * 1_000_003 + batch) % 2**31


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="q", dynamic_ncols=True, disable=not enabled)


def _prompts(data: TaskData, s: Settings, seed: int, cot: dict[str, bool]) -> list[str]:
    demos = {sub: P.choose_demonstrations(pool, s.shots, seed, cot[sub], source=f"{data.name}/{sub}")
             for sub, pool in data.pools.items()} if s.shots else {}
    return [P.build_prompt(q, demos.get(q.task, []), cot[q.task]) for q in data.questions]


def score_task(model, tok, data: TaskData, s: Settings, progress: bool = True) -> tuple[dict, list[dict]]:
    """-> (summary for results.json, one row per question and seed) on rank 0; ({}, []) elsewhere."""
    rank, world = _world()
    # chain of thought only for generation, and only where demonstrations carry explanations
    cot = {sub: s.method == "generate" and s.chain_of_thought and P.supports_chain_of_thought(pool)
           for sub, pool in data.pools.items()} if data.pools else {}
    for q in data.questions:
        cot.setdefault(q.task, False)
    rows = []
    bar = _progress(len(data.questions) * len(s.seeds), data.name, progress and rank == 0)
    for si, seed in enumerate(s.seeds):
        texts = _prompts(data, s, seed, cot)
        if s.method == "loglikelihood":
            mine = _loglikelihood_rows(model, tok, data, texts, s, rank, world, bar)
        else:
            mine = _generation_rows(model, tok, data, texts, s, seed, cot, rank, world, bar)
        for r in mine:
            r["seed"] = seed
            r["_order"] = (si, r["_order"])
        rows += mine
    bar.close()
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(rows, gathered, dst=0)
        if rank != 0:
            return {}, []
        rows = [r for part in gathered for r in part]
    rows.sort(key=lambda r: r.pop("_order"))
    return summarize(data, s, rows, cot), rows


def _loglikelihood_rows(model, tok, data, texts, s: Settings, rank, world, bar) -> list[dict]:
    prefix = [tok.bos_id]
    requests = []  # per question: its (context, continuation) pairs
    for q, text in zip(data.questions, texts):
        requests.append([encode_pair(tok.encode, text, c, prefix) for c in P.continuations(q)])
    # a question's cost: its distinct input sequences (options sharing all but their last token share one)
    sizes = [sum(len(x) for x in {tuple((c + k)[:-1]) for c, k in reqs}) for reqs in requests]
    rows = []
    for b, batch in enumerate(plan_batches(sizes, s.batch_tokens)):
        if b % world != rank:
            continue
        flat = [r for i in batch for r in requests[i]]
        scores = iter(loglikelihood_tokens(model, flat))
        for i in batch:
            q = data.questions[i]
            lls = [next(scores)[0] for _ in requests[i]]
            pred = max(range(len(lls)), key=lls.__getitem__)  # first of equal maxima
            rows.append(dict(_order=i, task=data.name, subtask=q.task, id=f"{q.task}/{q.id}",
                             prediction=q.labels[pred], gold=q.gold, correct=pred == q.answer,
                             loglikelihoods=dict(zip(q.labels, lls))))
        bar.update(len(batch))
    return rows


def _generation_rows(model, tok, data, texts, s: Settings, seed, cot, rank, world, bar) -> list[dict]:
    prompt_ids = [[tok.bos_id] + ids for ids in tok.encode_batch(texts)]
    n = s.samples
    per_call = max(1, s.batch_sequences // n)  # questions per generate call, all samples of a question together
    rows = []
    for b, batch in enumerate(plan_batches([1] * len(texts), per_call)):
        if b % world != rank:
            continue
        wanted = [prompt_ids[i] for i in batch for _ in range(n)]
        longest = any(cot[data.questions[i].task] for i in batch)
        max_new = s.max_new_tokens or (256 if longest else 16)
        limit = model.cfg.max_seq_len - max_new
        if limit < 1:
            raise ValueError(f"--max-new-tokens {max_new} leaves no room for a prompt in the model's "
                             f"max_seq_len {model.cfg.max_seq_len}")
        wanted = [p[-limit:] for p in wanted]  # keep the question and the nearest demonstrations
        outs = generate(model, wanted, max_new_tokens=max_new, temperature=s.temperature, top_p=s.top_p,
                        stop_ids=(tok.eos_id,), seed=_batch_seed(seed, b))
        for j, i in enumerate(batch):
            q = data.questions[i]
            # a blank line ends the answer: the model would go on with a new question
            gens = [tok.decode(o).split("\n\n")[0] for o in outs[j * n:(j + 1) * n]]
            answers = [extract_answer(g, q.labels, q.options) for g in gens]
            pred = majority_vote(answers)
            rows.append(dict(_order=i, task=data.name, subtask=q.task, id=f"{q.task}/{q.id}", prediction=pred,
                             gold=q.gold, correct=pred == q.gold, answers=answers, generations=gens))
        bar.update(len(batch))
    return rows


def summarize(data: TaskData, s: Settings, rows: list[dict], cot: dict[str, bool]) -> dict:
    """Accuracy over questions (each question's correctness averaged over the seeds) and its
    standard error across questions (sample standard deviation / sqrt(n), as lm-eval reports)."""
    def stats(subset):
        per_q: dict[str, list[bool]] = {}
        for r in subset:
            per_q.setdefault(r["id"], []).append(r["correct"])
        c = [sum(v) / len(v) for v in per_q.values()]
        n = len(c)
        acc = sum(c) / n
        var = sum((x - acc) ** 2 for x in c) / (n - 1) if n > 1 else float("nan")
        return acc, math.sqrt(var / n), n

    acc, se, n = stats(rows)
    out = dict(accuracy=acc, stderr=se, n_questions=n, shots=s.shots, seeds=list(s.seeds), method=s.method_name,
               chain_of_thought=any(cot.values()),
               per_seed={str(seed): stats([r for r in rows if r["seed"] == seed])[0] for seed in s.seeds})
    if s.method == "generate":
        out["no_answer"] = sum(r["prediction"] is None for r in rows)
    subs = sorted({r["subtask"] for r in rows})
    if len(subs) > 1:
        out["subtasks"] = {}
        for sub in subs:
            a, e, k = stats([r for r in rows if r["subtask"] == sub])
            out["subtasks"][sub] = dict(accuracy=a, stderr=e, n_questions=k)
    out["files"] = data.files
    return out


def distributed_setup(device_arg: str) -> torch.device:
    """Join the torchrun group when launched by torchrun (gloo on the CPU, NCCL on GPUs); -> this
    process's device."""
    cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_process_group("cuda" if cuda else "cpu")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")
