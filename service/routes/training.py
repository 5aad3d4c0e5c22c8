"""``/v1/training-jobs``: offline DeepLab jobs (train, evaluate, predict) on the training queue.

A training job is a staged job of one stage (``training``), recorded, advanced, leased, retried and
dead-lettered like a pipeline's stages (:class:`contract.pipelines.PipelineStore`). Its inputs are
checked (:class:`service.validation.Locations`) and its manifests frozen into its own prefix at
submit; it writes only under that prefix (``jobs/<id>/training/``), so no job can write into
another's results or read another key's model.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from contract.job_kinds import TRAINING
from contract.training import TrainingJobRequest, TrainingSpec
from rib_core.io.artifacts import training_input_key, training_key
from rib_core.io.storage import is_s3_uri
from service.deps import LocationsDep, Owner, QueueDep, RecordsDep, SettingsDep, TrainingsDep
from service.errors import error_responses
from service.inputs import frozen_manifest
from service.schemas import TrainingAccepted, TrainingStatus
from service.submissions import find_staged, stored, submit_staged
from service.validation import InputError, callback_url

router = APIRouter(tags=["training"])


@router.post("/training-jobs", status_code=202, response_model=TrainingAccepted,
             responses=error_responses(413, 422, 503))
def submit_training(req: TrainingJobRequest, owner: Owner, settings: SettingsDep, trainings: TrainingsDep,
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
    request = req.model_dump(mode="json", exclude_none=True)
    payload: dict[str, Any] = {**request, "output": records.storage.uri(training_key(job_id)), "owner": owner,
                               "request": request}

    def keep() -> TrainingSpec:
        for name, manifest in frozen.items():
            key = training_input_key(job_id, name)
            payload[f"{name}_sha256"] = records.put_frozen(key, manifest.dumps().encode())
            payload[name] = records.storage.uri(key)
        spec = TrainingSpec.model_validate(payload)
        records.put(training_key(job_id, TRAINING.record), {"job_id": job_id, "owner": owner,
                                                   "payload": spec.model_dump(mode="json")})
        return spec

    submit_staged(job_id, stored(keep), trainings, records, queue, settings)
    body = TrainingAccepted(job_id=job_id, state="queued", links={"status": f"/v1/training-jobs/{job_id}"})
    return JSONResponse(body.model_dump(exclude_none=True), status_code=202,
                        headers={"Location": f"/v1/training-jobs/{job_id}"})


@router.get("/training-jobs/{job_id}", response_model=TrainingStatus, responses=error_responses(404, 422, 503))
def training_status(job_id: str, owner: Owner, trainings: TrainingsDep, records: RecordsDep, queue: QueueDep,
                    settings: SettingsDep) -> dict[str, Any]:
    """State and, once finished, the job's result (checkpoint, scores) or error."""
    find_staged(job_id, owner, trainings, records, queue, settings)
    status = trainings.status(job_id)
    (stage,) = status["stages"].values()  # a training job is a job of one stage (contract.stages)
    body: dict[str, Any] = {"job_id": job_id, "state": status["state"], "spec": trainings.request(job_id),
                            "created_at": status["created_at"]}
    if status["state"] == "done":
        body["result"] = stage["report"]
    elif status["state"] == "failed":
        body["error"] = stage["error"]
    return body
