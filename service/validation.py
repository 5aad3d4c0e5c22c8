"""Input checks of the API: bad input is refused here with a message that says what to fix.

Nothing that fails these checks is stored or queued. Manifest and record checks are
``rib_core.data.datasets``' own (the same rules as the offline tools), and a request's stage settings are
checked by their config objects once merged into the service's defaults (their bounds keep one
request from exhausting a worker); the service adds what a schema cannot say: ids that are safe
storage keys, inputs only from allowed locations that exist, and the operator's RIB_MAX_CROP_SIZE.
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from contract.job_requests import JobItem
from contract.settings import Settings
from contract.webhooks import check_callback
from rib_core.config.network_configs import ClassifierTrainConfig, DeepLabTrainConfig
from rib_core.config.presets import completed, merge
from rib_core.config.rib_config import RibConfig
from rib_core.config.stage_configs import RefineConfig, StageConfig
from rib_core.data.datasets import (
    ImageError,
    ImageTooLargeError,
    Manifest,
    ManifestError,
    ManifestRecord,
    decode_image,
    parse_manifest,
    parse_records,
)
from rib_core.io.storage import is_s3_uri

Config = TypeVar("Config", bound=StageConfig)
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
# A request's stage settings, by their field in a request, as a 422 names them.
SECTIONS = {"rib": "RIB parameters", "refine": "refinement parameters", "classifier": "classifier settings",
            "deeplab": "DeepLab settings"}
Given = BaseModel | Mapping[str, Any] | str | None  # a section: a typed body, a JSON object, or its text (forms)


class InputError(ValueError):
    """A request the service refuses: HTTP status, a message, and per-line/per-item details."""

    def __init__(self, status: int, message: str, errors: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = list(errors)

    def body(self) -> dict[str, Any]:
        return {"detail": self.message, "errors": self.errors}


def id_error(image_id: Any) -> str | None:
    if isinstance(image_id, str) and SAFE_ID.fullmatch(image_id):
        return None
    return (f"id {image_id!r} is not a safe result key: use 1-200 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', no '..')")


def uri_error(uri: str, prefixes: Sequence[str], setting: str = "RIB_INPUT_PREFIXES") -> str | None:
    """Locations are only the configured ones (``setting`` names where), and never through '..'."""
    path = uri.split("://", 1)[1] if is_s3_uri(uri) else uri
    if ".." in path.split("/"):
        return f"{uri!r} contains '..'; give the location without it"
    if not any(uri.startswith(p) for p in prefixes):
        return f"{uri!r} is outside the allowed locations {list(prefixes)}; use one of them or change {setting}"
    return None


@dataclass
class Locations:
    """The one check of every location a request names (images, masks, manifests, weights,
    checkpoints), shared by ``/v1/jobs``, ``/v1/pipelines`` and ``/v1/training-jobs``: under
    RIB_INPUT_PREFIXES, never through '..', and never inside the service's results
    (RIB_STORAGE_URI) except the files of a job the caller owns (``owns``: job id -> bool).
    ``exists`` (a location -> bool) checks the ones that must be present at submit."""

    prefixes: Sequence[str]
    results_prefix: str = ""
    owns: Callable[[str], bool] = lambda job_id: False
    exists: Callable[[str], bool] = lambda uri: True

    def __call__(self, uri: str) -> str | None:
        if not (self.results_prefix and uri.startswith(self.results_prefix)):
            return uri_error(uri, self.prefixes)
        job = re.fullmatch(r"jobs/([0-9a-f]{32})/.+", uri[len(self.results_prefix):])
        if job is None or not self.owns(job.group(1)):
            return (f"{uri!r} is inside the service's results ({self.results_prefix}); a request may read "
                    "only its own jobs' files there: name your own input location")
        return uri_error(uri, [self.results_prefix])  # its own job's file: still never through '..'

    def check(self, named: dict[str, str | None], present: bool = True) -> None:
        """422 listing every bad one of ``named`` (field -> location); with ``present``, each must exist."""
        errors = [{"field": f, "error": e} for f, uri in named.items() if uri is not None and (e := self(uri))]
        errors += [{"field": f, "error": f"nothing at {uri}: give an existing location"} for f, uri in named.items()
                   if uri is not None and present and not any(e["field"] == f for e in errors) and not self.exists(uri)]
        if errors:
            raise InputError(422, "invalid locations; fix the listed fields", errors)


def callback_url(url: str | None, settings: Settings) -> str | None:
    """The job's ``callback_url`` (:mod:`contract.webhooks`), refused with 422 when this server may not call it."""
    if err := check_callback(url, settings):
        raise InputError(422, f"callback_url: {err}")
    return url


def parse_labels(values: Sequence[str]) -> list[str]:
    """Form fields may repeat ``labels`` or give one comma-separated list."""
    return list(dict.fromkeys(part.strip() for v in values for part in v.split(",") if part.strip()))


def check_upload(image_id: str, labels: Sequence[str], classes: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    """The id and class names of an uploaded image, checked like a manifest line."""
    if err := id_error(image_id):
        raise InputError(422, err)
    records, errors = parse_records([{"id": image_id, "image": "upload", "labels": list(labels)}], classes, 1)
    if errors:
        raise InputError(422, errors[0][1])
    return records[0].id, records[0].labels


def decode_upload(data: bytes, max_bytes: int, max_pixels: int) -> np.ndarray:
    if len(data) > max_bytes:
        raise InputError(413, f"the upload is {len(data)} bytes; the limit is {max_bytes} (RIB_MAX_UPLOAD_BYTES)")
    if not data:
        raise InputError(422, "the uploaded file is empty")
    try:
        return decode_image(data, max_pixels)
    except ImageTooLargeError as e:
        raise InputError(422, f"{e} (RIB_MAX_IMAGE_PIXELS); upload a smaller image") from e
    except ImageError as e:
        raise InputError(422, f"{e}; upload a PNG or JPEG image within the limits") from e


def invalid(what: str, errors: Sequence[tuple[str, str]]) -> InputError:
    """The 422 of ``errors`` ((field, message) pairs): a detail naming the first ones, and each listed."""
    listed = "; ".join(f"{field}: {msg}" if field else msg for field, msg in errors[:5])
    return InputError(422, f"invalid {what}: {listed}", [{"field": field, "error": msg} for field, msg in errors])


def _overridden(section: str, cls: type[Config], defaults: Config, given: Given) -> Config:
    """The service's ``defaults`` with a request's ``section`` merged in, validated by the config
    class the offline tools use."""
    if isinstance(given, str):
        try:
            given = json.loads(given) if given.strip() else {}
        except json.JSONDecodeError as e:
            raise InputError(422, f"{section} must be a JSON object ({e.msg} at column {e.colno})") from e
    if isinstance(given, BaseModel):
        given = given.model_dump(exclude_unset=True)
    if not isinstance(given, Mapping | None):
        raise InputError(422, f"{section} must be a JSON object of {SECTIONS[section]}")
    try:
        # Only what the defaults set explicitly, so that a request's ``preset`` fills every field
        # the operator left to the preset (a full dump would pin the VOC values).
        return cls.model_validate(completed(cls, merge(defaults.model_dump(exclude_unset=True), given or {})))
    except ValidationError as e:
        raise invalid(SECTIONS[section], [(".".join(map(str, err["loc"])), err["msg"]) for err in e.errors()]) from e


def rib_params(given: Given, defaults: RibConfig, max_crop: int) -> RibConfig:
    """The request's RIB parameters: the service defaults with the given fields replaced, within the
    operator's RIB_MAX_CROP_SIZE."""
    cfg = _overridden("rib", RibConfig, defaults, given)
    if cfg.crop_size > max_crop or max(cfg.resize_long) > max_crop:
        raise InputError(422, f"crop_size and resize_long must be at most {max_crop} (RIB_MAX_CROP_SIZE)")
    return cfg


def refine_params(given: Given, defaults: RefineConfig) -> RefineConfig:
    """The request's refinement settings (``RefineConfig``, as ``rib refine`` reads them): the
    service defaults (RIB_REFINE_DEFAULTS) with the given fields merged in, nested ones key by key."""
    return _overridden("refine", RefineConfig, defaults, given)


def classifier_params(given: Given) -> ClassifierTrainConfig:
    """A pipeline's classifier recipe (``ClassifierTrainConfig``, as ``rib train-classifier`` reads it)."""
    return _overridden("classifier", ClassifierTrainConfig, ClassifierTrainConfig(), given)


def deeplab_params(given: Given) -> DeepLabTrainConfig:
    """A pipeline's DeepLab settings (``DeepLabTrainConfig``, as ``rib deeplab`` reads them)."""
    return _overridden("deeplab", DeepLabTrainConfig, DeepLabTrainConfig(), given)


def _check_items(records: Sequence[Any], uris: Sequence[str], where: Sequence[dict[str, Any]],
                 classes: Sequence[str], locations: Locations) -> list[JobItem]:
    known = set(classes)
    errors = []
    for record, uri, loc in zip(records, uris, where, strict=True):
        unknown = sorted(set(record.labels) - known)
        problem = (id_error(record.id) or locations(uri)
                   or (f"{record.id!r} has class(es) {unknown} the model does not know; known: {list(classes)}"
                       if unknown else None))
        if problem:
            errors.append({**loc, "error": problem})
    if errors:
        raise InputError(422, f"{len(errors)} invalid image record(s); fix them and resubmit", errors)
    return [JobItem(r.id, uri, r.labels) for r, uri in zip(records, uris, strict=True)]


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Validating a large job allocates many small objects without cycles; Python's cyclic collector,
    run again and again over all of them, took half the time of a 100,000-line manifest."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def manifest_items(text: str, base: str, classes: Sequence[str], locations: Locations,
                   max_images: int) -> list[JobItem]:
    """Every image of a manifest, or an InputError listing every bad line; linear in its length, and a
    manifest of more than ``max_images`` lines is refused before any line is parsed."""
    return _checked_manifest(text, base, classes, locations, max_images)[1]


def _checked_manifest(text: str, base: str, classes: Sequence[str], locations: Locations,
                      max_images: int) -> tuple[Manifest, list[JobItem]]:
    """The parsed manifest and its images checked (:func:`manifest_items`), from one parse."""
    numbered = [n for n, ln in enumerate(text.splitlines(), start=1) if ln.strip()]
    if len(numbered) > max_images + 1:  # + the header
        raise InputError(422, f"the manifest has {len(numbered)} lines; a job takes at most {max_images} images "
                              "(RIB_MAX_JOB_IMAGES): split it")
    with _collector_paused():
        try:
            manifest = parse_manifest(text, base=base, classes=classes)
        except ManifestError as e:
            raise InputError(422, "invalid manifest; fix the listed lines and resubmit",
                             [{"line": n, "error": m} for n, m in e.errors]) from e
        lines = numbered[1:] if len(numbered) > len(manifest.records) else numbered
        return manifest, _check_items(manifest.records, [manifest.image_uri(r) for r in manifest.records],
                                      [{"line": n} for n in lines], classes, locations)


def dataset_manifest(text: str, base: str, locations: Locations, max_images: int) -> Manifest:
    """A data set's manifest for a pipeline or training job: its own header names the classes, every
    line's image and mask pass :class:`Locations`. Returned with every location absolute: the copy
    the job freezes at submit. An InputError lists every bad line."""
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    try:
        classes = json.loads(first).get("classes")
    except (json.JSONDecodeError, AttributeError):
        classes = None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise InputError(422, "the manifest must start with a header naming its classes: "
                              '{"format": "rib-manifest", "version": 1, "classes": [...]}')
    manifest, items = _checked_manifest(text, base, classes, locations, max_images)  # ids, images, labels
    with _collector_paused():
        masks = [manifest.mask_uri(r) for r in manifest.records]
        bad = [{"line": n, "error": err} for n, mask in enumerate(masks, start=2)
               if mask is not None and (err := locations(mask))]
        if bad:
            raise InputError(422, f"{len(bad)} invalid mask location(s); fix them and resubmit", bad)
        records = [ManifestRecord(it.id, it.image, it.labels, mask) for it, mask in zip(items, masks, strict=True)]
        return Manifest(manifest.classes, records, base)


def inline_items(items: Sequence[Any], classes: Sequence[str], locations: Locations,
                 max_images: int) -> list[JobItem]:
    """Records given in the request body (``item`` numbers count from 1)."""
    if not items:
        raise InputError(422, "images is empty; give at least one {id, image, labels} record")
    if len(items) > max_images:
        raise InputError(422, f"the job has {len(items)} images; the limit is {max_images} (RIB_MAX_JOB_IMAGES): "
                              "split it")
    with _collector_paused():
        records, errors = parse_records(items, classes, first_line=1)
        if errors:
            raise InputError(422, f"{len(errors)} invalid image record(s); fix them and resubmit",
                             [{"item": n, "error": m} for n, m in errors])
        return _check_items(records, [r.image for r in records], [{"item": n} for n in range(1, len(records) + 1)],
                            classes, locations)


def default_image_id(filename: str | None) -> str:
    """An upload without an ``image_id`` is named after its file, made safe as a key."""
    stem = PurePosixPath((filename or "").replace("\\", "/")).stem
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip("._-")[:200]
    return safe or "image"
