"""python -m train (or torchrun ... -m train): see README.md and train/config.py for the options.

Exit codes: 0 done; 1 training stopped (non-finite loss under nan_policy = stop, too many
skipped steps); 2 a user error (config, data, unusable checkpoint), one line on stderr;
128 + signal (143 SIGTERM, 130 SIGINT) interrupted, after saving a checkpoint that --resume
continues exactly."""
import os
import sys

from .checkpoint import CheckpointError
from .config import ConfigError, help_text, parse_args
from .data import ShardError
from .signals import TrainingInterrupted, fault_injection_hooks
from .trainer import TrainingStopped, run


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    try:
        cfg, flags = parse_args(argv)
        run(cfg, resume=flags["resume"], hooks=fault_injection_hooks(), overwrite=flags["overwrite"])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except ShardError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        if _rank() == 0:
            print(f"training interrupted: {e}", file=sys.stderr)
        return 128 + e.signum
    return 0


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _exit(code: int) -> None:
    """Leave a distributed run without the interpreter's teardown.

    On the CPU, gloo jobs with sequence parallelism sometimes abort at interpreter exit
    ("terminate called without an active exception") while background threads are torn down.
    Destroying the process group first and then leaving through os._exit avoids it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
