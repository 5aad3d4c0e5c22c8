"""The files of a result and where they live: names, encoders and the storage key layout.

One image's result is a folder of files (the map as ``.npz`` and as a picture, each pseudo-mask as
a label PNG with an overlay, ``meta.json``); the library encodes them, the worker stores them and
the API links to them, all with the names and keys defined here. Storage layout of a job::

    jobs/<job>/request.json               what the job was asked (written before it is queued)
    jobs/<job>/uploads/<image_id>         an uploaded image, as sent
    jobs/<job>/images/<image_id>/<file>   one image's result files, meta.json written last
    jobs/<job>/index.json                 every image's status and files, once all are accounted for

A pipeline job (a whole data set through every stage) keeps the work folder of
:mod:`rib_core.jobs.stages` under ``jobs/<job>/pipeline/`` (same relative paths), with
``pipeline.json`` (what it was asked, written before it is queued), ``stages/<stage>.json`` (a
stage's report, written last: the stage is complete when it exists) and ``index.json`` (per image:
map, CRF mask, IRN mask, re-training labels).

Torch-free: the API process imports it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from rib_core.io.localization_map import LocalizationMap
from rib_core.io.storage import Storage
from rib_core.io.visualize import label_png, map_overlay, mask_overlay, png_bytes

MAP_NPZ = "map.npz"        # RIB's M at image size (LocalizationMap.to_bytes)
MAP_PNG = "map.png"        # M's class-wise maximum over the image
MARKER = "meta.json"       # written last: an image is complete in storage when this exists
REFINEMENTS = ("irn", "crf")  # the final pseudo-mask is the first present: IRN's, else seed + CRF's

Artifacts = dict[str, tuple[bytes, str]]  # file name -> (bytes, content type)


def mask_name(refinement: str) -> str:
    return f"{refinement}_mask.png"


def overlay_name(refinement: str) -> str:
    return f"{refinement}_overlay.png"


def encode_result(image: np.ndarray, lmap: LocalizationMap, masks: Mapping[str, np.ndarray],
                  meta: Mapping[str, Any]) -> Artifacts:
    """The files of one image: the map (npz and a picture), each refinement's pseudo-mask and overlay,
    and ``meta.json`` (``meta`` plus the map's class keys and the image size)."""
    score = lmap.high_res.max(0) if len(lmap.keys) else np.zeros(image.shape[:2], np.float32)
    out: Artifacts = {MAP_NPZ: (lmap.to_bytes(), "application/octet-stream"),
                      MAP_PNG: (png_bytes(map_overlay(image, score)), "image/png")}
    for refinement in reversed(REFINEMENTS):
        if refinement in masks:
            out[mask_name(refinement)] = (label_png(masks[refinement]), "image/png")
            out[overlay_name(refinement)] = (png_bytes(mask_overlay(image, masks[refinement])), "image/png")
    body = {**meta, "keys": lmap.keys.tolist(), "size": list(image.shape[:2])}
    out[MARKER] = (json.dumps(body, indent=2).encode(), "application/json")
    return out


def final_files(names: Iterable[str]) -> dict[str, str]:
    """Which of an image's files are its map, its final pseudo-mask and that mask's overlay
    (``{}`` when it has none)."""
    present = set(names)
    for refinement in REFINEMENTS:
        if mask_name(refinement) in present:
            return {"map": MAP_NPZ, "mask": mask_name(refinement), "overlay": overlay_name(refinement)}
    return {}


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def image_key(job_id: str, image_id: str, name: str = "") -> str:
    """Storage key of a result file (or, with no name, the folder) of one image of one job."""
    return Storage.check_key(f"jobs/{job_id}/images/{image_id}/{name}") + ("" if name else "/")


def images_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/images/"


def upload_key(job_id: str, image_id: str) -> str:
    return Storage.check_key(f"jobs/{job_id}/uploads/{image_id}")


def index_key(job_id: str) -> str:
    return f"jobs/{job_id}/index.json"


def training_key(job_id: str, name: str = "") -> str:
    """A training job's own prefix (its output, frozen inputs and record) or a file under it."""
    return f"jobs/{job_id}/training/{name}"


def training_input_key(job_id: str, name: str) -> str:
    """The frozen copy of a training job's manifest ``name`` (manifest, evaluate_on)."""
    return training_key(job_id, f"inputs/{name}.jsonl")


REQUEST = "request.json"  # an image job's signed record, in its folder


def request_key(job_id: str) -> str:
    return job_prefix(job_id) + REQUEST


def job_manifest_key(job_id: str) -> str:
    """The frozen copy of a bulk job's manifest, as the request named it (its digest is in request.json)."""
    return f"jobs/{job_id}/inputs/manifest.jsonl"


def store_result(storage: Storage, job_id: str, image_id: str, artifacts: Artifacts) -> None:
    """Write one image's files, the marker last: a folder with ``meta.json`` is complete."""
    for name in sorted(artifacts, key=lambda n: n == MARKER):
        data, content_type = artifacts[name]
        storage.put(image_key(job_id, image_id, name), data, content_type)


def stored_files(storage: Storage, job_id: str) -> dict[str, list[str]]:
    """The file names in storage of every image of a job, by image id."""
    files: dict[str, list[str]] = {}
    for key in storage.list(images_prefix(job_id)):
        image_id, name = key.rsplit("/", 2)[-2:]
        files.setdefault(image_id, []).append(name)
    return files


# ----------------------------------------------------------------------------- pipeline jobs

PIPELINE_SPEC = "pipeline.json"
PIPELINE_MANIFEST = "inputs/manifest.jsonl"          # the data set, frozen at submit
PIPELINE_VAL_MANIFEST = "inputs/val_manifest.jsonl"  # the classifier's validation set, frozen at submit
PIPELINE_INDEX = "index.json"
PIPELINE_CANCELLED = "cancelled.json"  # written when the job is cancelled, so that a rebuilt job stays so
# Per image, the files of a pipeline job's work folder (rib_core.jobs.stages), by role; "mask" is the
# final pseudo-mask (IRN's random walk; the CRF's when refine.use_irn is false).
PIPELINE_IMAGE_FILES = {"map": "maps/{id}.npz", "crf_mask": "refined/crf/{id}.png",
                        "mask": "refined/masks/{id}.png", "overlay": "refined/overlays/{id}.png",
                        "confident_labels": "refined/ir_labels/{id}.png",
                        "retrain_labels": "refined/retrain_labels/{id}.png"}


def pipeline_key(job_id: str, relative: str = "") -> str:
    """Storage key of a file (or, with no name, the folder) of a pipeline job's work folder."""
    if not relative:
        return f"jobs/{job_id}/pipeline/"
    return Storage.check_key(f"jobs/{job_id}/pipeline/{relative}")


def stage_marker(stage: str) -> str:
    """A stage's report, relative to the work folder; written last."""
    return f"stages/{stage}.json"


def chunk_marker(stage: str, chunk: int) -> str:
    """A finished chunk of a chunked stage (its images without a result, and why), relative to the work folder."""
    return f"stages/{stage}/{chunk}.json"


def pipeline_index(job_id: str, image_ids: Iterable[str], present: Iterable[str]) -> list[dict[str, Any]]:
    """Per image, the storage keys of its files (``PIPELINE_IMAGE_FILES``) that ``present`` (keys) holds."""
    have = set(present)
    out = []
    for image_id in image_ids:
        files = {role: key for role, rel in PIPELINE_IMAGE_FILES.items()
                 if (key := pipeline_key(job_id, rel.format(id=image_id))) in have}
        out.append({"id": image_id, "files": files})
    return out
