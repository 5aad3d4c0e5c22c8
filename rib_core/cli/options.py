"""What every ``rib`` sub-command shares: its settings from the stage's config object (``--config``, then
``--set``), the device options and how a command is registered."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

C = TypeVar("C", bound=BaseModel)
# add(name, handler, help): a subcommand of ``rib``, returned for its arguments.
AddCommand = Callable[[str, Callable[[argparse.Namespace], None], str], argparse.ArgumentParser]

def build_config(cls: type[C], args: argparse.Namespace, base: dict[str, Any] | None = None) -> C:
    """The stage config from ``base``, then ``--config``, then ``--set`` overrides."""
    from rib_core.config.presets import completed, merge

    data = merge(base or {}, json.loads(Path(args.config).read_text()) if args.config else {})
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cls.model_validate(completed(cls, data))


def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", help="JSON file with the stage's settings")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting (repeatable)")
    return p


def with_device(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def device_of(args: argparse.Namespace) -> str:
    from rib_core.jobs.pipeline import resolve_device

    return str(resolve_device(args.device))
