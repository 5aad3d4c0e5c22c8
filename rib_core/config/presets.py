"""Named sets of the authors' per-data-set settings (``preset: voc | coco``) for the stage configs.

A config with a ``preset`` field fills, in a before-validator, the fields its preset table names
and the caller did not give: explicit values always win, nested configs merge key by key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

Preset = Literal["voc", "coco"]


def merge(preset: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """``preset`` with ``given``'s values; nested mappings merge key by key, ``given`` wins."""
    out = dict(preset)
    for key, value in given.items():
        base = out.get(key)
        out[key] = merge(base, value) if isinstance(base, Mapping) and isinstance(value, Mapping) else value
    return out


def with_preset(data: Any, table: Mapping[str, Mapping[str, Any]]) -> Any:
    """``data`` (the raw input of a config) with its preset's values where it gives none."""
    if not isinstance(data, Mapping):
        return data
    preset = data.get("preset", "voc")
    if preset not in table:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(table)}")
    return merge(table[preset], data)
