"""``/v1/pipelines``: a data set through the paper's whole chain as one job, its stages, results and cancel."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import JSONResponse

from contract.pipelines import PipelineSpec, PipelineStore
from rib_core.artifacts import PIPELINE_SPEC, pipeline_index, pipeline_key
from rib_core.datasets import parse_manifest
from rib_core.exports import ExportConfig, ExportFormat, export_job, pipeline_masks
from rib_core.storage import parent_uri
from service.deps import Owner, QueueDep, SettingsDep, StorageDep, StoreDep
from service.routes.jobs import MAX_OFFSET, read_manifest
from service.schemas import ExportLink, PipelineAccepted, PipelineRequest, PipelineResults, PipelineStatus
from service.submissions import STORAGE_ERRORS
from service.validation import (
    InputError,
    classifier_params,
    dataset_items,
    deeplab_params,
    refine_params,
    rib_params,
    uri_error,
)

router = APIRouter(tags=["pipelines"])


def pipeline_store(store: StoreDep) -> PipelineStore:
    return PipelineStore(store.r, store.ttl_s)


PipelinesDep = Annotated[PipelineStore, Depends(pipeline_store)]


def _spec(req: PipelineRequest, settings: SettingsDep, owner: str) -> PipelineSpec:
    """The request checked: locations, every stage's settings, and a data set large enough to train on."""
    s = settings
    for name in ("classifier_uri", "val_manifest_uri"):
        if (uri := getattr(req, name)) is not None and (err := uri_error(uri, s.input_prefixes)):
            raise InputError(422, f"{name}: {err}")
    classifier = classifier_params(req.classifier)
    rib = rib_params(req.rib, s.rib_defaults, s.max_crop_size)
    refine = refine_params(req.refine, s.refine_defaults)
    deeplab = deeplab_params(req.deeplab) if req.deeplab is not None else None
    _, items = dataset_items(read_manifest(req.manifest_uri, s), parent_uri(req.manifest_uri), s.input_prefixes,
                             s.max_job_images)
    batches = {"classifier.batch_size": classifier.batch_size if req.classifier_uri is None else 1,
               "refine.irn.batch_size": refine.irn.batch_size if refine.use_irn else 1}
    for name, size in batches.items():
        if len(items) < size:
            raise InputError(422, f"the data set has {len(items)} images, fewer than one batch ({name} = {size}): "
                                  "add images or lower it")
    ids = [it.id for it in items]
    return PipelineSpec(manifest=req.manifest_uri, classifier_uri=req.classifier_uri,
                        val_manifest=req.val_manifest_uri, classifier=classifier, rib=rib, refine=refine,
                        deeplab=deeplab, image_ids=ids, owner=owner,
                        chunks=[ids[i:i + s.chunk_size] for i in range(0, len(ids), s.chunk_size)])


@router.post("/pipelines", status_code=202, response_model=PipelineAccepted)
def submit_pipeline(req: PipelineRequest, owner: Owner, settings: SettingsDep, pipelines: PipelinesDep,
                    storage: StorageDep, queue: QueueDep) -> JSONResponse:
    """Classifier (unless one is given) -> RIB maps (image workers, in chunks) -> confident labels, IRN,
    random walk (training workers) -> DeepLab if asked: one Celery canvas, each stage resumable."""
    spec = _spec(req, settings, owner)
    job_id = uuid.uuid4().hex
    pipelines.create(job_id, spec, owner)
    try:
        storage.put(pipeline_key(job_id, PIPELINE_SPEC), spec.model_dump_json().encode(), "application/json")
    except STORAGE_ERRORS as e:
        pipelines.finish(job_id, spec.stages()[0], "failed", error=f"the job could not be stored ({type(e).__name__})")
        raise HTTPException(503, f"the results store is unreachable ({type(e).__name__}); job {job_id} is "
                                 "marked failed, submit it again later") from e
    try:
        queue.send_pipeline(job_id, spec)
    except Exception as e:
        pipelines.cancel(job_id, storage)
        raise HTTPException(503, f"the task queue is unreachable ({type(e).__name__}); the job was cancelled, "
                                 "resubmit it later") from e
    body = PipelineAccepted(job_id=job_id, state="queued", total=len(spec.image_ids), stages=spec.stages(),
                            links={"status": f"/v1/pipelines/{job_id}", "results": f"/v1/pipelines/{job_id}/results"})
    return JSONResponse(body.model_dump(), status_code=202, headers={"Location": f"/v1/pipelines/{job_id}"})


def owned(job_id: str, owner: Owner, pipelines: PipelinesDep, storage: StorageDep, queue: QueueDep) -> PipelineStore:
    """The store, once ``job_id`` is known to be the caller's pipeline (404 otherwise); a job Redis
    lost is rebuilt from storage first and queued again."""
    if not pipelines.exists(job_id) and (spec := pipelines.restore(job_id, storage)) is not None:
        queue.send_pipeline(job_id, spec)
    if not pipelines.exists(job_id, owner):
        raise HTTPException(404, f"no pipeline job {job_id!r} (unknown, or expired after RIB_JOB_TTL_S)")
    return pipelines


OwnedPipeline = Annotated[PipelineStore, Depends(owned)]


@router.get("/pipelines/{job_id}", response_model=PipelineStatus)
def pipeline_status(job_id: str, pipelines: OwnedPipeline) -> dict[str, Any]:
    """Each stage's state, time, progress, report and error."""
    return pipelines.status(job_id)


@router.get("/pipelines/{job_id}/results", response_model=PipelineResults)
def pipeline_results(job_id: str, pipelines: OwnedPipeline, storage: StorageDep, settings: SettingsDep,
                     offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    """Per image, links to the files written so far: map, CRF mask, final (IRN) mask, overlay,
    confident labels, re-training labels."""
    spec = PipelineSpec.model_validate_json(storage.get(pipeline_key(job_id, PIPELINE_SPEC)))
    ids = spec.image_ids[offset:offset + limit]
    present = [k for k in storage.list(pipeline_key(job_id)) if not k.endswith(".pth")]
    items = [{"id": it["id"], "files": {role: {"key": key, "uri": storage.uri(key),
                                               "url": storage.url(key, settings.presign_expires_s)}
                                        for role, key in it["files"].items()}}
             for it in pipeline_index(job_id, ids, present)]
    end = offset + len(ids)
    total = len(spec.image_ids)
    return {"job_id": job_id, "offset": offset, "limit": limit, "total": total,
            "next_offset": end if end < total else None, "items": items}


@router.get("/pipelines/{job_id}/export", response_model=ExportLink)
def export_pipeline(job_id: str, pipelines: OwnedPipeline, storage: StorageDep, settings: SettingsDep,
                    format: Annotated[ExportFormat, Query()], image_url_prefix: str | None = None) -> dict[str, Any]:
    """The final pseudo-masks written so far (IRN's) as COCO, Label Studio or VOC: one zip under the
    job's prefix, as for bulk jobs (``/v1/jobs/{id}/export``)."""
    spec = PipelineSpec.model_validate_json(storage.get(pipeline_key(job_id, PIPELINE_SPEC)))
    manifest = parse_manifest(read_manifest(spec.manifest, settings), base=parent_uri(spec.manifest))
    images = pipeline_masks(storage, job_id, manifest)
    try:
        key = export_job(storage, pipeline_key(job_id), manifest.classes,
                         ExportConfig(format=format, image_url_prefix=image_url_prefix), images=images)
    except ValueError as e:
        raise HTTPException(409, f"pipeline {job_id}: {e}") from e
    return {"format": format, "images": len(images), "key": key, "uri": storage.uri(key),
            "url": storage.url(key, settings.presign_expires_s)}


@router.delete("/pipelines/{job_id}", response_model=PipelineStatus)
def cancel_pipeline(job_id: str, pipelines: OwnedPipeline, storage: StorageDep) -> dict[str, Any]:
    """Stop the chain: stages not started end cancelled now, the running one at its next epoch or chunk."""
    state = pipelines.status(job_id)["state"]
    if state in ("done", "failed", "cancelled"):
        raise HTTPException(409, f"pipeline {job_id} already finished ({state}); nothing to cancel")
    try:
        pipelines.cancel(job_id, storage)
    except STORAGE_ERRORS as e:
        raise HTTPException(503, f"the results store is unreachable ({type(e).__name__}); pipeline {job_id} "
                                 "was not cancelled, try again later") from e
    return pipelines.status(job_id)
