"""``/v1/jobs``: bulk jobs (a manifest or inline records), their status, results and cancellation."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import JSONResponse

from contract.job_requests import SubmittedManifest, load_request, request_items
from rib_core.io.artifacts import job_prefix
from rib_core.io.export_sources import export_job, presigned_image_url
from rib_core.io.exports import ExportConfig, ExportFormat
from rib_core.io.storage import parent_uri
from service.bodies import JobRequest
from service.deps import ClassesDep, LocationsDep, Owner, SettingsDep
from service.errors import error_responses
from service.inputs import read_manifest
from service.schemas import MAX_OFFSET, ExportImages, ExportLink, JobAccepted, JobStatus, ResultsPage
from service.submissions import STORAGE_ERRORS, Jobs, JobsDep, accepted
from service.validation import InputError, callback_url, inline_items, manifest_items, refine_params, rib_params

router = APIRouter(tags=["jobs"])


@router.post("/jobs", status_code=202, response_model=JobAccepted, responses=error_responses(413, 422, 503))
def submit_job(req: JobRequest, owner: Owner, settings: SettingsDep, jobs: JobsDep, classes: ClassesDep,
               locations: LocationsDep) -> JSONResponse:
    """Many images at once; they are processed in chunks by every worker on the image queue."""
    s = settings
    if (req.manifest_uri is None) == (req.images is None):
        raise InputError(422, "give exactly one of manifest_uri and images")
    rib = rib_params(req.rib, s.rib_defaults, s.max_crop_size)
    refine = refine_params(req.refine, s.refine_defaults)
    callback = callback_url(req.callback_url, s)
    manifest = None
    if req.manifest_uri is not None:
        manifest = SubmittedManifest(read_manifest(req.manifest_uri, s, locations), parent_uri(req.manifest_uri),
                                     tuple(classes))
        items = manifest_items(manifest.text, manifest.base, classes, locations, s.max_job_images)
    else:
        items = inline_items(req.images or [], classes, locations, s.max_job_images)
    job_id = uuid.uuid4().hex
    jobs.submit(job_id, "bulk", items, rib, refine, owner, callback, manifest=manifest)
    return accepted(job_id, total=len(items))


def owned(job_id: str, owner: Owner, jobs: JobsDep) -> Jobs:
    """The jobs view, once ``job_id`` is known to belong to the caller (404 otherwise)."""
    jobs.find(job_id, owner)
    return jobs


OwnedJob = Annotated[Jobs, Depends(owned)]


@router.get("/jobs/{job_id}", response_model=JobStatus, responses=error_responses(404, 422, 503))
def job_status(job_id: str, jobs: OwnedJob) -> dict[str, Any]:
    """State, counts (queued, running, done, failed, skipped), per-image errors, timing and progress
    (images per minute, seconds to go)."""
    return jobs.store.status(job_id)


@router.get("/jobs/{job_id}/results", response_model=ResultsPage, responses=error_responses(404, 422, 503))
def job_results(job_id: str, jobs: OwnedJob, offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    """Per image: status, storage keys and presigned URLs of the map, the pseudo-mask, the overlay and the rest."""
    return jobs.results(job_id, offset, limit)


@router.delete("/jobs/{job_id}", response_model=JobStatus, responses=error_responses(404, 409, 422, 503))
def cancel_job(job_id: str, jobs: OwnedJob) -> dict[str, Any]:
    """Skip every image not started yet; images already running finish and are kept whole."""
    state = jobs.store.status(job_id)["state"]
    if state in ("done", "failed"):
        raise HTTPException(409, f"job {job_id} already finished ({state}); nothing to cancel")
    try:
        jobs.store.cancel(job_id, jobs.storage)
    except STORAGE_ERRORS as e:
        raise HTTPException(503, f"the results store is unreachable ({type(e).__name__}); job {job_id} "
                                 "was not cancelled, try again later") from e
    return jobs.store.status(job_id)


@router.get("/jobs/{job_id}/export", response_model=ExportLink, responses=error_responses(404, 409, 422, 503))
def export(job_id: str, jobs: OwnedJob, classes: ClassesDep, format: Annotated[ExportFormat, Query()],
           image_url_prefix: str | None = None, images: ExportImages = True) -> dict[str, Any]:
    """The job's finished pseudo-masks (IRN's, else seed + CRF's) as COCO (pycocotools RLE), a Label
    Studio task list with its labelling config, or VOC palette PNGs: one zip written under the
    job's prefix in storage, returned as a presigned link. Images still running are left out;
    call again when the job is done. Ignore pixels (255) are in no COCO or Label Studio region."""
    uris = {it.id: it.image for it in request_items(jobs.records, load_request(jobs.records, job_id))}
    cfg = ExportConfig(format=format, image_url_prefix=image_url_prefix, images=images)
    try:
        key = export_job(jobs.storage, job_prefix(job_id), classes, cfg, uris,
                         image_url=presigned_image_url(jobs.storage, jobs.settings.presign_expires_s))
    except ValueError as e:
        raise HTTPException(409, f"job {job_id}: {e}") from e
    images = int(jobs.store.status(job_id, max_errors=0)["counts"]["done"])
    return {"format": format, "images": images, **jobs.link(key)}
