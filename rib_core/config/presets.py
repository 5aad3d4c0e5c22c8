"""Named sets of the authors' per-data-set settings (``preset: voc | coco``) for the stage configs.

A config with a ``preset`` field fills, in a before-validator, the fields its preset table names
and the caller did not give: explicit values always win, nested configs merge key by key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

from pydantic import BaseModel

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


def completed(cls: type[BaseModel], data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` (the raw input of ``cls``) with every nested config it gives in part completed from
    that field's own default, at every depth: ``{"crf": {"iterations": 5}}`` keeps the rest of
    DeepLab's CRF (``DEEPLAB_CRF``), not ``CrfConfig()``'s. A default contributes only where it
    differs from its class's own defaults, so that what a preset or a dataset fills later (its
    before-validators run after this) is never pinned to the default's preset."""
    out = dict(data)
    for name, field in cls.model_fields.items():
        value, kind = out.get(name), _config_class(field.annotation)
        if isinstance(value, Mapping) and kind is not None:
            default = field.get_default(call_default_factory=True)
            base = _differences(default.model_dump(), kind().model_dump()) \
                if isinstance(default, kind) and not any(f.is_required() for f in kind.model_fields.values()) else {}
            out[name] = completed(kind, merge(base, value))
    return out


def _differences(values: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that differ from ``reference``'s, nested mappings entry by entry."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        other = reference.get(key)
        if isinstance(value, Mapping) and isinstance(other, Mapping):
            if inner := _differences(value, other):
                out[key] = inner
        elif value != other:
            out[key] = value
    return out


def _config_class(annotation: Any) -> type[BaseModel] | None:
    """The config class of a field typed ``X`` or ``X | None``; None for any other type."""
    classes = [a for a in get_args(annotation) or (annotation,) if isinstance(a, type) and issubclass(a, BaseModel)]
    return classes[0] if len(classes) == 1 else None
