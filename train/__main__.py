"""python -m train: see README.md and train/config.py for the options."""
import sys

from .config import ConfigError, help_text, parse_args
from .data import ShardError
from .trainer import TrainingStopped, run


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    try:
        cfg, flags = parse_args(argv)
        run(cfg, resume=flags["resume"])
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


if __name__ == "__main__":
    sys.exit(main())
