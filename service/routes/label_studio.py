"""``/ls``: a Label Studio ML backend (``/health``, ``/setup``, ``/predict``), so that Label Studio users
get RIB's pseudo-masks as pre-annotations. Connect it in Label Studio (Model, Connect model) with the
URL ``<api>/ls`` and Basic Authentication: any user name, an API key of this server as password.

``/predict`` runs RIB on each task's image through the image-job path every client uses (one job
for the request's tasks, waited for up to ``RIB_LABEL_STUDIO_WAIT_S``) and answers one prediction
per task: a brush region (Label Studio's RLE) per class of the final pseudo-mask, each with a score,
the mean of RIB's map M for that class inside the region, and the prediction's score, the mean of
its regions' scores. RIB needs each image's class labels; they come from the task, in this order:
``data.labels`` (a list, or names separated by commas), else the ``Choices`` on the image in the
task's latest annotation, else in its latest prediction; a task with none gets the classifier's
(:meth:`rib_core.jobs.pipeline.PseudoMaskPipeline.predict_labels`; the image's ``meta.json`` says which).

The task's image is the ``Image`` tag's ``$value``: an ``s3://`` URI under ``RIB_INPUT_PREFIXES``
(the workers read it), or a file Label Studio serves (``/data/upload/...``, or a URL on the host of
``RIB_LABEL_STUDIO_URL``), which the API downloads with ``RIB_LABEL_STUDIO_TOKEN`` and stores as an
upload. No other host is fetched from.
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urljoin, urlsplit

import httpx
import numpy as np
from fastapi import APIRouter, Depends, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from contract.job_requests import JobItem
from contract.settings import Settings
from rib_core import __version__
from rib_core.data.datasets import decode_mask
from rib_core.io.artifacts import MAP_NPZ, final_files, image_key
from rib_core.io.exports import LS_BRUSH, LS_IMAGE, brush_regions
from rib_core.io.storage import Storage, is_s3_uri
from service.deps import ClassesDep, SettingsDep, api_key_header, locations, require_api_key
from service.errors import error_responses
from service.schemas import example
from service.submissions import Jobs, JobsDep
from service.validation import (
    InputError,
    Locations,
    check_upload,
    decode_upload,
    id_error,
    parse_labels,
    refine_params,
    rib_params,
)

MODEL_VERSION = f"rib-{__version__}"
basic_auth = HTTPBasic(auto_error=False, description="Label Studio's Basic Authentication: any user name, an API "
                                                     "key of this server as password")


def label_studio_owner(settings: SettingsDep, key: Annotated[str | None, Depends(api_key_header)],
                       basic: Annotated[HTTPBasicCredentials | None, Depends(basic_auth)]) -> str:
    """The caller's identity, from ``X-API-Key`` or from the password of HTTP basic auth (what Label
    Studio sends for an ML backend)."""
    return require_api_key(key or (basic.password if basic else None), settings)


router = APIRouter(prefix="/ls", tags=["label studio"], dependencies=[Depends(label_studio_owner)],
                   responses=error_responses(401))
LsOwner = Annotated[str, Depends(label_studio_owner)]


LABEL_CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
                '<Label value="cat"/><Label value="dog"/></BrushLabels></View>')


class SetupRequest(BaseModel):
    """Label Studio's set-up call; other fields it sends are accepted and ignored."""

    model_config = ConfigDict(extra="allow", populate_by_name=True,
                              json_schema_extra={"examples": [{"project": "1.1700000000", "schema": LABEL_CONFIG}]})

    project: str | int | None = Field(None, description="Label Studio's project id")
    label_config: str | None = Field(None, alias="schema", description="the project's labelling config (XML)")


class PredictRequest(BaseModel):
    """Label Studio's prediction call; other fields it sends are accepted and ignored."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "tasks": [{"id": 7, "data": {"image": "s3://data/cats/cat_001.jpg", "labels": "cat"}}],
        "project": "1.1700000000", "label_config": LABEL_CONFIG}]})

    tasks: list[dict[str, Any]] = Field(description="Label Studio tasks: id, data, annotations, predictions")
    project: str | int | None = Field(None, description="Label Studio's project id")
    label_config: str | None = Field(None, description="the project's labelling config (XML); default: the "
                                                       "config of this service's Label Studio export")


class LsHealth(BaseModel):
    model_config = example({"status": "UP", "model_class": "RIB", "model_version": "rib-0.1.0"})

    status: str = Field(description='"UP"')
    model_class: str
    model_version: str


class SetupResponse(BaseModel):
    model_config = example({"model_version": "rib-0.1.0"})

    model_version: str


class PredictResponse(BaseModel):
    model_config = example({"results": [{"result": [{"from_name": "tag", "to_name": "image", "type": "brushlabels",
                                                     "value": {"format": "rle", "rle": [0, 1], "brushlabels": ["cat"]},
                                                     "score": 0.71}], "score": 0.71, "model_version": "rib-0.1.0"}],
                            "model_version": "rib-0.1.0"})

    results: list[dict[str, Any]] = Field(description="one prediction per task, in the tasks' order: result "
                                                      "(brush regions), score, model_version")
    model_version: str


@dataclass(frozen=True)
class Target:
    """Where predictions go in the project's labelling config."""

    from_name: str              # the BrushLabels tag
    to_name: str                # the Image tag it labels
    value: str                  # the task data field holding the image
    labels: dict[int, str]      # mask value -> BrushLabels label (the model's classes among its labels)
    choices: str | None         # a Choices tag on the same image: image-level class labels


def brush_target(label_config: str | None, classes: list[str]) -> Target:
    """The project's BrushLabels tag and its image; 422 when the config has none RIB can fill."""
    if not label_config:
        return Target(LS_BRUSH, LS_IMAGE, LS_IMAGE, dict(enumerate(classes, start=1)), None)
    from label_studio_sdk.label_interface import LabelInterface

    try:
        interface = LabelInterface(label_config)
    except Exception as e:
        raise InputError(422, f"the labelling config cannot be read: {e}") from e
    brushes = [c for c in interface.controls if c.tag.lower() == "brushlabels"]
    if not brushes:
        raise InputError(422, "the labelling config has no BrushLabels tag: RIB predicts brush masks; add "
                              "<BrushLabels name=... toName=...> with the model's classes as labels")
    brush = brushes[0]
    image = interface.get_object(brush.to_name[0])
    labels = {classes.index(name) + 1: name for name in brush.labels if name in classes}
    if not labels:
        raise InputError(422, f"none of the BrushLabels labels {list(brush.labels)} is a class of the model: "
                              f"{classes}")
    choices = next((c.name for c in interface.controls if c.tag.lower() == "choices" and image.name in c.to_name),
                   None)
    return Target(brush.name, image.name, image.value.lstrip("$"), labels, choices)


def task_labels(task: dict[str, Any], target: Target) -> list[str]:
    """The task's class labels (module docstring); [] when it has none (the worker's classifier picks them)."""
    given = (task.get("data") or {}).get("labels")
    if given:
        return parse_labels(given if isinstance(given, list) else [str(given)])
    for source in ("annotations", "predictions"):
        for entry in reversed(task.get(source) or []):
            for region in entry.get("result") or []:
                if region.get("type") == "choices" and region.get("from_name") == target.choices:
                    return list(region.get("value", {}).get("choices", []))
    return []


def label_studio_file(source: str, settings: Settings, where: str) -> bytes:
    """A file Label Studio serves (a path on it, or a URL on its host), downloaded with its token."""
    base = settings.label_studio_url
    if not base:
        raise InputError(422, f"{where}: the image {source!r} is no s3:// URI, and this server has no "
                              "RIB_LABEL_STUDIO_URL to fetch Label Studio's files from")
    url = urljoin(base.rstrip("/") + "/", source)
    if urlsplit(url)[:2] != urlsplit(base)[:2]:
        raise InputError(422, f"{where}: the image {source!r} is neither an s3:// URI under RIB_INPUT_PREFIXES nor "
                              f"a file of the Label Studio at RIB_LABEL_STUDIO_URL ({base})")
    token = settings.label_studio_token
    headers = {"Authorization": f"Token {token.get_secret_value()}"} if token else {}
    limit = settings.max_upload_bytes
    try:
        with httpx.stream("GET", url, headers=headers, timeout=30, follow_redirects=False) as response:
            if response.status_code != 200:
                hint = " (check RIB_LABEL_STUDIO_TOKEN)" if response.status_code in (401, 403) else ""
                raise InputError(422, f"{where}: Label Studio answered {response.status_code} for {url}{hint}")
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > limit:
                    break
    except httpx.HTTPError as e:
        raise HTTPException(502, f"{where}: cannot download {url} from Label Studio: {type(e).__name__}: {e}") from e
    return bytes(data)


def task_items(tasks: list[dict[str, Any]], target: Target, classes: list[str], jobs: Jobs,
               job_id: str, where_ok: Locations) -> tuple[list[JobItem], dict[str, bytes]]:
    """The job's items, one per task (id ``task-<task id>``), and the images the API downloaded."""
    s = jobs.settings
    items: list[JobItem] = []
    uploads: dict[str, bytes] = {}
    for n, task in enumerate(tasks):
        where = f"task {task.get('id', n)}"
        image_id, labels = f"task-{task.get('id', n)}", task_labels(task, target)
        try:
            names = check_upload(image_id, labels, classes)[1] if labels else ()  # none: the classifier's
            if err := id_error(image_id):
                raise InputError(422, err)
        except InputError as e:
            raise InputError(e.status, f"{where}: {e.message}") from e
        source = (task.get("data") or {}).get(target.value)
        if not isinstance(source, str) or not source:
            raise InputError(422, f"{where}: no image in data.{target.value}")
        if is_s3_uri(source):
            if err := where_ok(source):
                raise InputError(422, f"{where}: {err}")
            items.append(JobItem(image_id, source, names))
            continue
        data = label_studio_file(source, s, where)
        try:
            decode_upload(data, s.max_upload_bytes, s.max_image_pixels)
        except InputError as e:
            raise InputError(e.status, f"{where}: {e.message}") from e
        uploads[image_id] = data
        items.append(jobs.upload_item(job_id, image_id, names))
    if len({it.id for it in items}) != len(items):
        raise InputError(422, "two tasks have the same id")
    return items, uploads


def prediction(storage: Storage, job_id: str, record: dict[str, Any], target: Target) -> dict[str, Any]:
    """A finished image's Label Studio prediction: its brush regions, each scored by RIB's map."""
    files = final_files(record["artifacts"])
    mask = decode_mask(storage.get(image_key(job_id, record["id"], files["mask"])))
    with np.load(io.BytesIO(storage.get(image_key(job_id, record["id"], MAP_NPZ))), allow_pickle=False) as z:
        keys, high_res = z["keys"].tolist(), z["high_res"]
    regions = brush_regions(mask, target.labels, record["id"], target.from_name, target.to_name)
    value_of = {name: value for value, name in target.labels.items()}
    for region in regions:
        value = value_of[region["value"]["brushlabels"][0]]
        region["score"] = float(high_res[keys.index(value - 1)][mask == value].mean())
    score = float(np.mean([r["score"] for r in regions])) if regions else 0.0
    return {"result": regions, "score": score, "model_version": MODEL_VERSION}


@router.get("/health", response_model=LsHealth)
def health() -> dict[str, str]:
    """Label Studio's connection check."""
    return {"status": "UP", "model_class": "RIB", "model_version": MODEL_VERSION}


@router.post("/setup", response_model=SetupResponse, responses=error_responses(413, 422, 503))
def setup(req: SetupRequest, classes: ClassesDep) -> dict[str, str]:
    """Label Studio's project set-up: the labelling config is checked here (422 with what to change)."""
    brush_target(req.label_config, classes)
    return {"model_version": MODEL_VERSION}


@router.post("/predict", response_model=PredictResponse, responses=error_responses(413, 422, 502, 503, 504))
async def predict(req: PredictRequest, owner: LsOwner, settings: SettingsDep, jobs: JobsDep,
                  classes: ClassesDep) -> dict[str, Any]:
    """RIB's pseudo-masks of the tasks' images as Label Studio predictions (module docstring)."""
    target = brush_target(req.label_config, classes)
    if len(req.tasks) > settings.max_job_images:
        raise InputError(422, f"{len(req.tasks)} tasks; the limit is {settings.max_job_images} (RIB_MAX_JOB_IMAGES)")
    if not req.tasks:
        return {"results": [], "model_version": MODEL_VERSION}
    job_id = uuid.uuid4().hex
    items, uploads = await run_in_threadpool(task_items, req.tasks, target, classes, jobs, job_id,
                                             locations(owner, settings, jobs.store))
    rib = rib_params(None, settings.rib_defaults, settings.max_crop_size)
    refine = refine_params(None, settings.refine_defaults)
    await run_in_threadpool(jobs.submit, job_id, "labelstudio", items, rib, refine, owner, None, uploads)
    if await jobs.wait(job_id, settings.label_studio_wait_s) is None:
        raise HTTPException(504, f"RIB did not finish the {len(items)} task(s) within RIB_LABEL_STUDIO_WAIT_S="
                                 f"{settings.label_studio_wait_s:g} s; job {job_id} goes on: /v1/jobs/{job_id}/results")
    records = await run_in_threadpool(jobs.store.items, job_id)
    if failed := [f"{r['id']}: {r['error']}" for r in records if r["status"] != "done"]:
        raise HTTPException(502, f"RIB failed on {len(failed)} of {len(records)} task(s) (job {job_id}): "
                                 + "; ".join(failed))
    results = await run_in_threadpool(lambda: [prediction(jobs.storage, job_id, r, target) for r in records])
    return {"results": results, "model_version": MODEL_VERSION}
