"""``/v1/training-jobs``: offline DeepLab jobs (train, evaluate, predict) on the training queue.

A job's inputs are checked (:class:`service.validation.Locations`) and its manifests frozen into its
own prefix at submit; it writes only under that prefix (``jobs/<id>/training/``), so no job can
write into another's results or read another key's model.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse

from contract.tasks import TrainingJobPayload, TrainingJobRequest
from rib_core.io.artifacts import training_input_key, training_key
from rib_core.io.storage import is_s3_uri
from service.deps import LocationsDep, Owner, QueueDep, RecordsDep, SettingsDep, StoreDep
from service.errors import error_responses
from service.inputs import frozen_manifest
from service.schemas import TrainingAccepted, TrainingStatus
from service.submissions import STORAGE_ERRORS
from service.validation import InputError, callback_url

router = APIRouter(tags=["training"])


@router.post("/training-jobs", status_code=202, response_model=TrainingAccepted,
             responses=error_responses(413, 422, 503))
def submit_training(req: TrainingJobRequest, owner: Owner, settings: SettingsDep, store: StoreDep,
                    queue: QueueDep, records: RecordsDep, locations: LocationsDep) -> JSONResponse:
    """A DeepLab job for the training workers; its inputs are checked and frozen here."""
    if req.kind != "train" and req.checkpoint is None:
        raise InputError(422, f"a {req.kind} job needs a checkpoint")
    init = req.config.init_weights
    local_init = init is not None and settings.allow_local_init_weights and not is_s3_uri(init)
    locations.check({"checkpoint": req.checkpoint, "config.init_weights": None if local_init else init})
    callback_url(req.callback_url, settings)
    frozen = {name: frozen_manifest(uri, settings, locations)
              for name, uri in (("manifest", req.manifest), ("evaluate_on", req.evaluate_on)) if uri is not None}
    job_id = uuid.uuid4().hex
    payload: dict[str, Any] = {**req.model_dump(mode="json", exclude_none=True),
                               "output": records.storage.uri(training_key(job_id)), "owner": owner}
    try:
        for name, manifest in frozen.items():
            key = training_input_key(job_id, name)
            payload[f"{name}_sha256"] = records.put_frozen(key, manifest.dumps().encode())
            payload[name] = records.storage.uri(key)
        records.put(training_key(job_id, "training.json"), {"job_id": job_id, "owner": owner, "payload": payload})
    except STORAGE_ERRORS as e:
        raise HTTPException(503, f"the results store is unreachable ({type(e).__name__}); nothing was queued, "
                                 "submit the job again later") from e
    store.create_training(job_id, req.model_dump(mode="json", exclude_none=True), owner)
    queue.send_training(job_id, TrainingJobPayload.model_validate(payload))
    body = TrainingAccepted(job_id=job_id, state="queued", links={"status": f"/v1/training-jobs/{job_id}"})
    return JSONResponse(body.model_dump(exclude_none=True), status_code=202,
                        headers={"Location": f"/v1/training-jobs/{job_id}"})


@router.get("/training-jobs/{job_id}", response_model=TrainingStatus, responses=error_responses(404, 422, 503))
def training_status(job_id: str, owner: Owner, store: StoreDep, queue: QueueDep) -> dict[str, Any]:
    """State and, once finished, the job's result (checkpoint, scores) or error."""
    record = store.training(job_id, owner)
    if record is None:
        raise HTTPException(404, f"no training job {job_id!r}")
    state, result = queue.training_result(job_id)
    body: dict[str, Any] = {"job_id": job_id, "state": state, **record}
    if state == "done":
        body["result"] = result
    elif state == "failed":
        body["error"] = f"{type(result).__name__}: {result}"
    return body
