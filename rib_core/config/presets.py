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
    DeepLab's CRF (``DEEPLAB_CRF``), not ``CrfConfig()``'s. A default contributes only the fields it
    sets, so a nested ``preset`` still fills the others."""
    out = dict(data)
    for name, field in cls.model_fields.items():
        value, kind = out.get(name), _config_class(field.annotation)
        if isinstance(value, Mapping) and kind is not None:
            default = field.get_default(call_default_factory=True)
            base = default.model_dump(exclude_unset=True) if isinstance(default, BaseModel) else {}
            out[name] = completed(kind, merge(base, value))
    return out


def _config_class(annotation: Any) -> type[BaseModel] | None:
    """The config class of a field typed ``X`` or ``X | None``; None for any other type."""
    classes = [a for a in get_args(annotation) or (annotation,) if isinstance(a, type) and issubclass(a, BaseModel)]
    return classes[0] if len(classes) == 1 else None
