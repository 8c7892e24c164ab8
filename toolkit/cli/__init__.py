"""`toolkit` command line: data, train, config, evaluate, export, predict, preview, inspect, report, models,
completion.

parser.py defines the arguments, commands.py what each subcommand does; this module runs one.
Each command imports its stage lazily, so `toolkit --help` and `toolkit predict` start
fast and predict never imports torch. Errors a user can cause are one line; --debug
shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys

from toolkit import UserError
from toolkit.cli.commands import COMMANDS, resolve_config
from toolkit.cli.parser import build_parser
from toolkit.core.process import OPENMP_DEFAULTS

__all__ = ["build_parser", "main", "missing_extra", "resolve_config"]


# the optional extra that brings each package (pyproject.toml); the base install is what `predict` needs
EXTRAS = {"torch": "train", "torchvision": "train", "accelerate": "train", "onnx": "train", "onnxscript": "train",
          "safetensors": "train", "matplotlib": "train", "timm": "timm", "pyarrow": "parquet", "ray": "ray",
          "fsspec": "storage", "s3fs": "storage", "tensorboardX": "tensorboard"}


def missing_extra(e: ModuleNotFoundError) -> str | None:
    """One line naming the extra to install for a package missing from this install, or None."""
    package = (e.name or "").split(".")[0]
    extra = EXTRAS.get(package)
    if extra is None:
        return None
    what = "training, export and torch checkpoints" if extra == "train" else f"this ({package})"
    return f"{package} is not installed: {what} needs the {extra} extra: pip install 'toolkit[{extra}]'"


# what continues an interrupted command, said when Ctrl-C stops it (rows and states already written are kept)
RESUME_HINTS = {"train": "; the same command with train.resume=auto continues the run from its last saved state",
                "predict": "; the same command with --resume continues the output"}


def main(argv: list[str] | None = None) -> None:
    for key, value in OPENMP_DEFAULTS.items():  # before any command imports torch
        os.environ.setdefault(key, value)  # the user's own setting wins
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("toolkit").setLevel(logging.INFO)
    if "LOCAL_RANK" in os.environ or "ACCELERATE_DYNAMO_BACKEND" in os.environ:
        # started by a launcher (torchrun / accelerate launch): die with it, even when it is SIGKILLed, instead
        # of training on as an orphan that a restart would race; the last resume state continues the run
        import signal

        from toolkit.core.process import die_with_parent

        die_with_parent(signal.SIGKILL)
    try:
        COMMANDS[args.command](args)
    except UserError as e:
        if args.debug:
            raise
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"{rank}error: {e}", file=sys.stderr)
        sys.exit(2)
    except ModuleNotFoundError as e:
        line = missing_extra(e)
        if line is None or args.debug:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"interrupted{RESUME_HINTS.get(args.command, '')}", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader went away (`toolkit evaluate ... | head -1`): stop quietly, like head's writer
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so Python's exit flush cannot fail again
        sys.exit(141)
    except OSError as e:  # the last net under the stages' own messages: a file system error is one line too
        if args.debug:
            raise
        where = f" '{e.filename}'" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(2)
