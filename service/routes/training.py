"""``/v1/training-jobs``: offline DeepLab jobs (train, evaluate, predict) on the training queue."""

from __future__ import annotations

import uuid
from typing import Any

from botocore.exceptions import BotoCoreError
from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse

from contract.settings import Settings
from rib_core.storage import bucket_exists, is_s3_uri, split_s3_uri
from service.deps import Owner, QueueDep, SettingsDep, StoreDep
from service.schemas import TrainingAccepted, TrainingJobRequest, TrainingStatus
from service.validation import InputError, uri_error

router = APIRouter(tags=["training"])


def _location_errors(req: TrainingJobRequest, s: Settings) -> list[dict[str, str]]:
    """Inputs from RIB_INPUT_PREFIXES, the output inside RIB_OUTPUT_PREFIXES (kept apart: a worker
    resumes from what lies under its output), initial weights never a worker-local path by default."""
    checks = [(name, uri, s.input_prefixes, "RIB_INPUT_PREFIXES")
              for name in ("manifest", "checkpoint", "evaluate_on") if (uri := getattr(req, name)) is not None]
    checks.append(("output", req.output, s.output_prefixes, "RIB_OUTPUT_PREFIXES"))
    init = req.config.init_weights
    if init is not None and not (s.allow_local_init_weights and not is_s3_uri(init)):
        checks.append(("config.init_weights", init, s.input_prefixes,
                       "RIB_INPUT_PREFIXES, or RIB_ALLOW_LOCAL_INIT_WEIGHTS for a path on the worker"))
    return [{"field": name, "error": err} for name, uri, prefixes, setting in checks
            if (err := uri_error(uri, prefixes, setting))]


@router.post("/training-jobs", status_code=202, response_model=TrainingAccepted)
def submit_training(req: TrainingJobRequest, owner: Owner, settings: SettingsDep, store: StoreDep,
                    queue: QueueDep) -> JSONResponse:
    """A DeepLab job for the training workers; its inputs and output are checked here."""
    if errors := _location_errors(req, settings):
        raise InputError(422, "invalid locations", errors)
    uris = [req.manifest, req.output, req.checkpoint, req.evaluate_on, req.config.init_weights]
    buckets = sorted({split_s3_uri(u)[0] for u in uris if u is not None and is_s3_uri(u)})
    try:
        missing = [b for b in buckets if not bucket_exists(b)]
    except BotoCoreError as e:
        raise HTTPException(503, f"the object store is unreachable ({type(e).__name__}); retry later") from e
    if missing:
        raise InputError(422, f"no bucket named {', '.join(missing)}: create it or give another location")
    if req.kind != "train" and req.checkpoint is None:
        raise InputError(422, f"a {req.kind} job needs a checkpoint")
    job_id = uuid.uuid4().hex
    store.create_training(job_id, req.model_dump(exclude_none=True), owner)
    queue.send_training(job_id, req)
    body = TrainingAccepted(job_id=job_id, state="queued", links={"status": f"/v1/training-jobs/{job_id}"})
    return JSONResponse(body.model_dump(exclude_none=True), status_code=202,
                        headers={"Location": f"/v1/training-jobs/{job_id}"})


@router.get("/training-jobs/{job_id}", response_model=TrainingStatus)
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
