"""`mobilellm-r1`: one command, a subcommand per stage.

Each area of the package registers its own subcommands (``register(subparsers)`` in its ``cli`` module),
so this file only wires them together. Errors the user can fix (bad config, missing file, bad input, the
faults of :mod:`mobilellm_r1.faults`) exit with status 2 and one clear line instead of a traceback; a
training stage stopped by SIGTERM/SIGUSR1 after checkpointing exits with ``faults.EXIT_PREEMPTED`` (143).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from . import __version__

# Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = [
    "mobilellm_r1.data.cli",
    "mobilellm_r1.curation.cli",
    "mobilellm_r1.model.cli",
    "mobilellm_r1.train.cli",
    "mobilellm_r1.posttrain.cli",
    "mobilellm_r1.eval.cli",
    "mobilellm_r1.eval.probe",
    "mobilellm_r1.deploy.cli",
    "mobilellm_r1.influence.cli",
    "mobilellm_r1.demo",
]


class UserError(Exception):
    """An error caused by input the user can fix; printed without a traceback."""


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mobilellm-r1", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mobilellm-r1 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .faults import EXIT_PREEMPTED, FaultError, Preempted

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except (UserError, ConfigError, FileNotFoundError, FaultError) as e:
        print(f"mobilellm-r1 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:  # not an error: the checkpoint is written, a scheduler requeues on this status
        print(f"mobilellm-r1 {args.command}: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    return int(rc or 0)


if __name__ == "__main__":  # run through the package module so exception classes are the same objects
    from mobilellm_r1.cli import main as _main

    sys.exit(_main())
