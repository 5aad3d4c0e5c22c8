"""``/v1/pipelines``: a data set through the paper's whole chain as one job, its stages, results and cancel."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import JSONResponse

from contract.pipelines import PipelineStore
from contract.records import UntrustedRecordError
from contract.stages import PipelineSpec
from rib_core.data.datasets import Manifest, parse_manifest
from rib_core.io.artifacts import PIPELINE_MANIFEST, PIPELINE_SPEC, PIPELINE_VAL_MANIFEST, pipeline_index, pipeline_key
from rib_core.io.export_sources import export_job, pipeline_masks, presigned_image_url
from rib_core.io.exports import ExportConfig, ExportFormat
from service.bodies import PipelineRequest
from service.deps import LocationsDep, Owner, PipelinesDep, QueueDep, RecordsDep, SettingsDep, StorageDep
from service.errors import error_responses
from service.inputs import frozen_manifest
from service.schemas import (
    MAX_OFFSET,
    ExportImages,
    ExportLink,
    PipelineAccepted,
    PipelineResults,
    PipelineStatus,
)
from service.submissions import STORAGE_ERRORS, find_staged, stored, submit_staged
from service.validation import (
    InputError,
    Locations,
    callback_url,
    classifier_params,
    deeplab_params,
    refine_params,
    rib_params,
)

router = APIRouter(tags=["pipelines"])


def _spec(req: PipelineRequest, settings: SettingsDep, owner: str, locations: Locations,
          ) -> tuple[PipelineSpec, Manifest, Manifest | None]:
    """The request checked: locations, every stage's settings, and a data set large enough to train on."""
    s = settings
    classifier = classifier_params(req.classifier)
    rib = rib_params(req.rib, s.rib_defaults, s.max_crop_size)
    refine = refine_params(req.refine, s.refine_defaults)
    deeplab = deeplab_params(req.deeplab) if req.deeplab is not None else None
    weights = {"classifier_uri": req.classifier_uri, "classifier.init_weights": classifier.init_weights,
               "refine.irn.init_weights": refine.irn.init_weights,
               "deeplab.init_weights": deeplab.init_weights if deeplab else None}
    locations.check(weights)
    manifest = frozen_manifest(req.manifest_uri, s, locations)
    if classifier.stop == "plateau" and req.classifier_uri is None and not req.val_manifest_uri:
        raise InputError(422, "classifier.stop=plateau ends training by the validation curve: give val_manifest_uri "
                              "(without it the classifier is scored on its own training images)")
    validation = frozen_manifest(req.val_manifest_uri, s, locations) if req.val_manifest_uri else None
    if validation is not None and validation.classes != manifest.classes:
        raise InputError(422, f"val_manifest_uri's classes {validation.classes} differ from the data set's "
                              f"{manifest.classes}")
    batches = {"classifier.batch_size": classifier.batch_size if req.classifier_uri is None else 1,
               "refine.irn.batch_size": refine.irn.batch_size if refine.use_irn else 1}
    for name, size in batches.items():
        if len(manifest) < size:
            raise InputError(422, f"the data set has {len(manifest)} images, fewer than one batch ({name} = {size}): "
                                  "add images or lower it")
    ids = [r.id for r in manifest.records]
    spec = PipelineSpec(manifest=req.manifest_uri, classifier_uri=req.classifier_uri,
                        val_manifest=req.val_manifest_uri, classifier=classifier, rib=rib, refine=refine,
                        deeplab=deeplab, image_ids=ids, owner=owner, callback_url=callback_url(req.callback_url, s),
                        chunks=[ids[i:i + s.chunk_size] for i in range(0, len(ids), s.chunk_size)])
    return spec, manifest, validation


@router.post("/pipelines", status_code=202, response_model=PipelineAccepted,
             responses=error_responses(413, 422, 503))
def submit_pipeline(req: PipelineRequest, owner: Owner, settings: SettingsDep, pipelines: PipelinesDep,
                    records: RecordsDep, queue: QueueDep, locations: LocationsDep) -> JSONResponse:
    """Classifier (unless one is given) -> RIB maps (image workers, in chunks) -> confident labels, IRN,
    random walk (training workers) -> DeepLab if asked; each stage resumable. The data set's
    records are frozen in the job's prefix: later changes to the manifest change nothing."""
    spec, manifest, validation = _spec(req, settings, owner, locations)
    job_id = uuid.uuid4().hex

    def keep() -> None:
        spec.manifest_sha256 = records.put_frozen(pipeline_key(job_id, PIPELINE_MANIFEST), manifest.dumps().encode())
        if validation is not None:
            spec.val_manifest_sha256 = records.put_frozen(pipeline_key(job_id, PIPELINE_VAL_MANIFEST),
                                                          validation.dumps().encode())
        records.put(pipeline_key(job_id, PIPELINE_SPEC), spec.model_dump(mode="json"))

    stored(keep)
    submit_staged(job_id, spec, pipelines, records, queue, settings)
    body = PipelineAccepted(job_id=job_id, state="queued", total=len(spec.image_ids), stages=spec.stages(),
                            links={"status": f"/v1/pipelines/{job_id}", "results": f"/v1/pipelines/{job_id}/results"})
    return JSONResponse(body.model_dump(), status_code=202, headers={"Location": f"/v1/pipelines/{job_id}"})


def owned(job_id: str, owner: Owner, pipelines: PipelinesDep, records: RecordsDep, queue: QueueDep,
          settings: SettingsDep) -> PipelineStore:
    """The store, once ``job_id`` is known to be the caller's pipeline (404 otherwise; a job Redis
    lost is rebuilt first: :func:`service.submissions.find_staged`)."""
    find_staged(job_id, owner, pipelines, records, queue, settings)
    return pipelines


OwnedPipeline = Annotated[PipelineStore, Depends(owned)]


def owned_spec(job_id: str, _: OwnedPipeline, records: RecordsDep) -> PipelineSpec:
    """The caller's pipeline's spec, read from its signed record (only the routes that need it: a
    status poll reads Redis alone)."""
    try:
        return PipelineSpec.model_validate(records.get(pipeline_key(job_id, PIPELINE_SPEC)))
    except (FileNotFoundError, UntrustedRecordError) as e:
        raise HTTPException(409, f"pipeline {job_id}: its record in storage is unusable ({e})") from e
    except STORAGE_ERRORS as e:
        raise HTTPException(503, f"the results store is unreachable ({type(e).__name__}); retry later") from e


OwnedSpec = Annotated[PipelineSpec, Depends(owned_spec)]


@router.get("/pipelines/{job_id}", response_model=PipelineStatus, responses=error_responses(404, 422, 503))
def pipeline_status(job_id: str, pipelines: OwnedPipeline) -> dict[str, Any]:
    """Each stage's state, time, progress, report and error."""
    return pipelines.status(job_id)


@router.get("/pipelines/{job_id}/results", response_model=PipelineResults,
            responses=error_responses(404, 409, 422, 503))
def pipeline_results(job_id: str, spec: OwnedSpec, storage: StorageDep, settings: SettingsDep,
                     offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    """Per image, links to the files written so far: map, CRF mask, final (IRN) mask, overlay,
    confident labels, re-training labels."""
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


@router.get("/pipelines/{job_id}/export", response_model=ExportLink, responses=error_responses(404, 409, 422, 503))
def export_pipeline(job_id: str, spec: OwnedSpec, records: RecordsDep, settings: SettingsDep,
                    format: Annotated[ExportFormat, Query()], image_url_prefix: str | None = None,
                    images: ExportImages = True) -> dict[str, Any]:
    """The final pseudo-masks written so far (IRN's) as COCO, Label Studio or VOC: one zip under the
    job's prefix, as for bulk jobs (``/v1/jobs/{id}/export``). Read from the job's frozen manifest."""
    storage = records.storage
    try:
        text = records.get_frozen(pipeline_key(job_id, PIPELINE_MANIFEST), spec.manifest_sha256).decode()
        manifest = parse_manifest(text)
        masks = pipeline_masks(storage, job_id, manifest)
        key = export_job(storage, pipeline_key(job_id), manifest.classes,
                         ExportConfig(format=format, image_url_prefix=image_url_prefix, images=images), images=masks,
                         image_url=presigned_image_url(storage, settings.presign_expires_s))
    except STORAGE_ERRORS as e:
        raise HTTPException(503, f"the results store is unreachable ({type(e).__name__}); retry later") from e
    except (ValueError, UntrustedRecordError) as e:  # no mask yet, or a frozen input that changed
        raise HTTPException(409, f"pipeline {job_id}: {e}") from e
    return {"format": format, "images": len(masks), "key": key, "uri": storage.uri(key),
            "url": storage.url(key, settings.presign_expires_s)}


@router.delete("/pipelines/{job_id}", response_model=PipelineStatus,
               responses=error_responses(404, 409, 422, 503))
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
