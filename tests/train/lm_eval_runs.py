"""One lm-eval run with the "meditron" adapter, in one process or under torchrun:
python tests/train/lm_eval_runs.py CHECKPOINT TASK_DIR OUT.json. Rank 0 writes the accuracies and
per-document log-likelihoods."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main(checkpoint, task_dir, out):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import train.evaluate.lm_eval_adapter  # noqa: F401  (registers "meditron")

    res = lm_eval.simple_evaluate(model="meditron", model_args=f"checkpoint={checkpoint},tokenizer=byte,dtype=float32",
                                  tasks=["anatomy_local"], num_fewshot=1, log_samples=True,
                                  task_manager=TaskManager(include_path=task_dir, include_defaults=False))
    if res is None:  # only the other ranks of a data-parallel run
        open(f"{out}.rank{os.environ['RANK']}", "w").close()
    else:
        samples = sorted((s["doc_id"], [r[0] for r in s["filtered_resps"]]) for s in res["samples"]["anatomy_local"])
        with open(out, "w") as f:
            json.dump(dict(acc=res["results"]["anatomy_local"]["acc,none"], samples=samples), f)


if __name__ == "__main__":
    main(*sys.argv[1:])
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
