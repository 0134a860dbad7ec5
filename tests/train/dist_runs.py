"""Several training runs one after another in one torchrun job, so a test pays for the job's
start-up once: torchrun --standalone --nproc-per-node N tests/train/dist_runs.py SPEC.json

SPEC.json is a list of runs: {"out_dir": DIR, "args": [command-line options of python -m train],
"resume": bool, "copy_from": DIR (optional; copied to out_dir first, keeping checkpoints up to
"keep_until" steps)}. Exits 0 only when every run finished.
"""
import json
import os
import shutil
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def copy_run(src: str, dst: str, keep_until: int | None) -> None:
    """A copy of run directory src whose newest checkpoint is at most step keep_until."""
    shutil.copytree(src, dst)
    ckpts = os.path.join(dst, "checkpoints")
    if keep_until is not None and os.path.isdir(ckpts):
        for name in os.listdir(ckpts):
            if name.startswith("step_") and int(name[5:]) > keep_until:
                shutil.rmtree(os.path.join(ckpts, name))


def main(spec_path: str) -> int:
    import torch.distributed as dist

    from train.config import parse_args
    from train.trainer import run

    with open(spec_path) as f:
        runs = json.load(f)
    for r in runs:
        if r.get("copy_from"):
            # Rank 0 copies; the others reach the checkpoint only through collectives that
            # need rank 0, so no extra barrier is needed when the group is not formed yet.
            if int(os.environ.get("RANK", "0")) == 0:
                copy_run(r["copy_from"], r["out_dir"], r.get("keep_until"))
            if dist.is_initialized():
                dist.barrier()
        cfg, _ = parse_args(list(r["args"]) + ["--out-dir", r["out_dir"]])
        run(cfg, resume=r.get("resume", False), progress=False)
    return 0


if __name__ == "__main__":
    try:
        code = main(sys.argv[1])
    except BaseException:
        traceback.print_exc()
        code = 1
    # leave as train/__main__.py does: gloo jobs with sequence parallelism can abort in the teardown
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
