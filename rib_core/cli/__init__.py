"""``rib``: every stage from the command line.

Exit codes scripts can rely on: 0 success, 2 bad usage (argparse), 3 bad input (a manifest,
checkpoint, image or config that cannot be used; the message says what to fix), 1 anything else.
Stage settings come from the stage's config object: ``--config file.json`` and/or ``--set
key=value`` (dotted keys for nested settings, JSON values), e.g. ``--set iterations=5 --set
pooling=gap``. Torch computes with ``RIB_TORCH_THREADS`` threads (default: ``OMP_NUM_THREADS``
if set, else every core this process may use, ``os.sched_getaffinity``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from pydantic import ValidationError

from rib_core.cli.data import data_commands
from rib_core.cli.jobs import cmd_remote, job_commands
from rib_core.cli.maps import classifier_and_map_commands
from rib_core.cli.refinement import refinement_commands
from rib_core.data.datasets import ImageError, ManifestError
from rib_core.training.checkpoints import CheckpointError

EXIT_INPUT = 3


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="rib", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], None], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        return p

    for commands in (data_commands, classifier_and_map_commands, refinement_commands, job_commands):
        commands(add)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["remote"]:
        cmd_remote(argparse.Namespace(remote_args=argv[1:]))
    args = parser().parse_args(argv)
    try:
        if args.command not in ("serve", "worker"):  # those two set their own, per worker process
            from rib_core.runtime.threads import use_torch_threads

            use_torch_threads(int(os.environ.get("RIB_TORCH_THREADS") or 0) or None)
        args.fn(args)
    except (ManifestError, CheckpointError, ImageError, ValidationError, FileNotFoundError, ValueError) as e:
        print(f"rib {args.command}: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    return 0
