"""``POST /v1/images``: one uploaded image, answered with its job, or its result when ready within ``wait``."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.bodies import UploadForm
from service.deps import ClassesDep, Owner, SettingsDep
from service.errors import error_responses
from service.schemas import FinishedUpload, JobAccepted
from service.submissions import JobsDep, accepted
from service.validation import (
    callback_url,
    check_upload,
    decode_upload,
    default_image_id,
    parse_labels,
    refine_params,
    rib_params,
)

router = APIRouter(tags=["jobs"])


@router.post("/images", status_code=202, response_model=JobAccepted,
             responses={200: {"model": FinishedUpload, "description": "finished within `wait`: the status and "
                                                                      "the results"},
                        202: {"description": "queued: poll the status link"}, **error_responses(413, 422, 503)})
async def submit_image(
    form: Annotated[UploadForm, Form(media_type="multipart/form-data")],
    owner: Owner,
    settings: SettingsDep,
    jobs: JobsDep,
    classes: ClassesDep,
    wait: Annotated[float, Query(ge=0, le=60, description="seconds to wait for the result")] = 0,
) -> Any:
    """One image and its class names; returns a job id, or the result itself when it is ready within ``wait``.

    Async: blocking work (decoding, Redis, storage) runs in the thread pool.
    """
    s = settings
    data = await form.file.read(s.max_upload_bytes + 1)
    image_id, names = check_upload(form.image_id or default_image_id(form.file.filename), parse_labels(form.labels),
                                   classes)
    rib_cfg = rib_params(form.rib, s.rib_defaults, s.max_crop_size)
    refine_cfg = refine_params(form.refine, s.refine_defaults)
    callback = await run_in_threadpool(callback_url, form.callback_url, s)  # resolves the host name
    await run_in_threadpool(decode_upload, data, s.max_upload_bytes, s.max_image_pixels)
    job_id = uuid.uuid4().hex
    await run_in_threadpool(jobs.submit_upload, job_id, image_id, names, data, rib_cfg, refine_cfg, owner, callback)
    if wait and (status := await jobs.wait(job_id, wait)) is not None:
        results = await run_in_threadpool(jobs.results, job_id, 0, 1)
        return JSONResponse(FinishedUpload.model_validate({**status, "results": results}).model_dump(),
                            status_code=200)
    return accepted(job_id, image_id=image_id)
