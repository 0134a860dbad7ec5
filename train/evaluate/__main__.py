"""python -m train.evaluate --checkpoint DIR --tasks medqa_4options,medmcqa,pubmedqa,mmlu_medical
--data-dir DIR --shots K [--seeds 1234,432,32] [--method generate] [--sc-cot N --temperature 0.8]

Accuracy of a checkpoint on Meditron's benchmarks, from local data (docs/evaluate.md). Writes
OUT/results.json and OUT/predictions.jsonl and prints a table. Under torchrun the questions are
shared among the processes, with the same results as one process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import meditron_kernels as mk

from .runner import Settings, distributed_setup, score_task
from .tasks import DataError, load_task, parse_tasks


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"repeated seed in {text!r}")
    return seeds


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[1])
    p.add_argument("--checkpoint", required=True, help="a Hugging Face Llama directory, or a training run / checkpoint directory")
    p.add_argument("--tokenizer", default=None, help="as the trainer's data.tokenizer: byte, a .model, a tokenizer.json "
                   "or a directory (default: the HF directory's own, or the run's)")
    p.add_argument("--tasks", required=True, help="comma-separated: medqa_4options, medmcqa, pubmedqa, mmlu_medical, "
                   "or one MMLU subject as mmlu_<subject>")
    p.add_argument("--data-dir", required=True, help="the folder holding the benchmarks' files (docs/evaluate.md)")
    p.add_argument("--shots", type=int, default=0, help="demonstrations before each question (Meditron: 3 for 7B, 5 for 70B)")
    p.add_argument("--seeds", type=_seeds, default=(1234,), help="demonstration (and sampling) seeds, e.g. 1234,432,32")
    p.add_argument("--method", choices=["loglikelihood", "generate"], default="loglikelihood",
                   help="score the options' log-likelihoods, or generate and extract the answer")
    p.add_argument("--sc-cot", type=int, default=None, metavar="N",
                   help="self-consistency chain of thought: N samples, the majority answer (implies --method generate)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 0.8 with --sc-cot, else 0)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 16 for direct answers, 256 with chain of thought")
    p.add_argument("--batch-tokens", type=int, default=8192, help="log-likelihood: tokens per packed forward")
    p.add_argument("--batch-sequences", type=int, default=32, help="generation: sequences per generate call")
    p.add_argument("--out", default="eval", help="output folder for results.json and predictions.jsonl")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--backend", default=None, choices=["torch", "triton", "cuda"], help="meditron_kernels backend (default auto)")
    p.add_argument("--no-progress", action="store_true")
    return p


def settings(args) -> Settings:
    if args.shots < 0:
        raise ValueError(f"--shots must be >= 0, got {args.shots}")
    method, samples = args.method, 1
    if args.sc_cot is not None:
        if args.sc_cot < 1:
            raise ValueError(f"--sc-cot must be >= 1, got {args.sc_cot}")
        method, samples = "generate", args.sc_cot
    temperature = args.temperature if args.temperature is not None else (0.8 if args.sc_cot else 0.0)
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    if samples > 1 and temperature == 0:
        raise ValueError(f"--sc-cot {samples} with temperature 0 would vote over {samples} identical greedy answers")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    for name in ("max_new_tokens", "batch_tokens", "batch_sequences"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    return Settings(shots=args.shots, seeds=args.seeds, method=method, samples=samples,
                    chain_of_thought=args.sc_cot is not None, temperature=temperature,
                    top_p=args.top_p, max_new_tokens=args.max_new_tokens, batch_tokens=args.batch_tokens,
                    batch_sequences=args.batch_sequences)


def table(results: dict) -> str:
    # columns as wide as their longest entry ("self-consistency" is wider than a fixed 14)
    rows = []
    for name, r in results.items():
        rows.append((name, r["method"].split(" ")[0], str(r["shots"]), r))
        rows += [(f"  {sub}", "", "", v) for sub, v in r.get("subtasks", {}).items()]
    wt = max([len("task")] + [len(x[0]) for x in rows])
    wm = max([len("method")] + [len(x[1]) for x in rows])
    head = f"{'task':<{wt}} {'method':<{wm}} {'shots':>5} {'n':>6}  accuracy"
    lines = [head, "-" * (len(head) + 8)]
    for name, method, shots, v in rows:
        lines.append(f"{name:<{wt}} {method:<{wm}} {shots:>5} {v['n_questions']:>6}  "
                     f"{100 * v['accuracy']:6.2f} ± {100 * v['stderr']:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        s = settings(args)
        names = parse_tasks(args.tasks)
        if not os.path.isdir(args.data_dir):
            raise FileNotFoundError(f"--data-dir {args.data_dir!r}: no such directory")
        # every file is read and checked before the model is loaded
        data = [load_task(n, args.data_dir, demonstrations=s.shots > 0) for n in names]
        device = distributed_setup(args.device)
        dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        from .load import load_model_and_tokenizer

        model, tok, info = load_model_and_tokenizer(args.checkpoint, args.tokenizer, device=device, dtype=dtype)
        results, rows = {}, []
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        with mk.use_backend(args.backend):
            for d in data:
                t0 = time.perf_counter()
                summary, task_rows = score_task(model, tok, d, s, progress=not args.no_progress)
                if rank == 0:
                    seconds = time.perf_counter() - t0
                    summary.update(seconds=seconds, questions_per_s=summary["n_questions"] * len(s.seeds) / seconds)
                    results[d.name] = summary
                    rows += task_rows
    except (DataError, ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(dict(model=info, world_size=world, tasks=results), f, indent=1)
        with open(os.path.join(args.out, "predictions.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(table(results))
        print(f"wrote {os.path.join(args.out, 'results.json')} and predictions.jsonl")
    return 0


if __name__ == "__main__":
    from train.__main__ import _exit

    _exit(main())
