"""The Lua scripts Redis runs atomically for the job stores and the webhook outbox, one file each."""

from __future__ import annotations

from importlib import resources


def script(*names: str) -> str:
    """The text of ``<name>.lua`` for each name, in order: a script that calls a shared function
    (``count_chunk``) is loaded after the file that defines it."""
    return "\n".join(resources.files(__name__).joinpath(f"{name}.lua").read_text() for name in names)
