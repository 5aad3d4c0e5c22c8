"""The Lua scripts Redis runs atomically for the job stores, one file each."""

from __future__ import annotations

from importlib import resources


def script(name: str) -> str:
    """The text of ``<name>.lua``."""
    return resources.files(__name__).joinpath(f"{name}.lua").read_text()
