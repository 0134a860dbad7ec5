"""python -m train (or torchrun ... -m train): see README.md and train/config.py for the options."""
import os
import sys

from .config import ConfigError, help_text, parse_args
from .data import ShardError
from .trainer import TrainingStopped, fault_injection_hooks, run


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    try:
        cfg, flags = parse_args(argv)
        run(cfg, resume=flags["resume"], hooks=fault_injection_hooks())
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except ShardError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 1
    return 0


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
