"""The HTTP API (``service.main:app``): validate, schedule, report. The science runs in the workers.

Every ``/v1`` route needs an API key in the ``X-API-Key`` header; ``/healthz``, ``/readyz``,
``/metrics`` and the OpenAPI docs (``/docs``) do not. Input is checked here and refused with a 4xx
that says what to fix, so that nothing invalid is stored or reaches a worker.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import cache, partial
from typing import Annotated, Any, Literal

import anyio
import anyio.to_thread
import redis
from botocore.exceptions import BotoCoreError, ClientError
from celery.result import AsyncResult
from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Query, Request, Response, UploadFile, params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rib_core import __version__
from rib_core.datasets import load_manifest
from rib_core.rib_config import RibConfig
from rib_core.stage_configs import DeepLabTrainConfig
from rib_core.storage import (
    Storage,
    bucket_exists,
    is_s3_uri,
    parent_uri,
    read_bytes,
    split_s3_uri,
    uri_exists,
    uri_size,
)
from service.jobs import JobItem, JobStore, image_key, owner_of, save_request, upload_key
from service.metrics import LATENCY, REGISTRY, REJECTED, REQUESTS, SUBMITTED, RedisStatsCollector
from service.settings import Settings, get_settings
from service.validation import (
    InputError,
    check_upload,
    decode_upload,
    default_image_id,
    inline_items,
    manifest_items,
    parse_labels,
    rib_params,
    uri_error,
)
from worker.celery_app import TRAINING_JOB, send_chunks
from worker.celery_app import app as celery_app

MULTIPART_OVERHEAD = 64 * 1024  # form fields and boundaries around the uploaded file
READY_TIMEOUT_S = 2.0  # /readyz: each check answers within this or counts as failing
MAX_OFFSET = 2**62     # results paging: Redis list indexes are 64-bit
FINISHED = ("done", "failed", "cancelled")
TRAINING_STATES = {"PENDING": "queued", "RECEIVED": "queued", "RETRY": "queued", "STARTED": "running",
                   "SUCCESS": "done", "FAILURE": "failed", "REVOKED": "cancelled"}


@dataclass
class Service:
    """The API's clients, created once per process."""

    settings: Settings
    store: JobStore
    storage: Storage
    broker: redis.Redis
    _classes: list[str] = field(default_factory=list)

    def classes(self) -> list[str]:
        """The model's class names, from the companion manifest's header (read on first use)."""
        if not self._classes:
            uri = self.settings.companion_manifest_uri
            if not uri:
                raise HTTPException(503, "the service has no model configured (RIB_COMPANION_MANIFEST_URI)")
            try:
                self._classes = load_manifest(uri, verify_files=False).classes
            except Exception as e:
                raise HTTPException(503, f"the service cannot read its companion manifest {uri}: {e}") from e
        return self._classes

    def record(self, job_id: str, kind: str, items: Sequence[JobItem], rib: RibConfig, owner: str) -> None:
        """Record the job in Redis, then keep the request in storage, so that a job Redis loses can be
        rebuilt from it; with storage down the job ends failed (:meth:`fail_unstored`)."""
        params = rib.model_dump(mode="json")
        self.store.create(job_id, kind, items, params, owner)
        try:
            save_request(self.storage, job_id, kind, items, params, owner)
        except (OSError, BotoCoreError, ClientError) as e:
            self.fail_unstored(job_id, [it.id for it in items], e)

    def fail_unstored(self, job_id: str, image_ids: Sequence[str], error: Exception) -> None:
        """Storage refused a recorded job's input: its images end failed with the reason (a terminal
        state, never a job that waits forever), and the client is told to submit again."""
        for image_id in image_ids:
            self.store.mark_failed(job_id, image_id, f"the job's input could not be stored ({type(error).__name__})")
        raise HTTPException(503, f"the results store is unreachable ({type(error).__name__}); job {job_id} "
                                 "is marked failed, submit it again later") from error

    def queue(self, job_id: str, kind: str, items: Sequence[JobItem], rib: RibConfig) -> None:
        """Queue a recorded job in chunks; a broker failure cancels the job instead of half-queueing it."""
        params = rib.model_dump(mode="json")
        try:
            send_chunks(job_id, items, params)
        except Exception as e:
            self.store.cancel(job_id)
            raise HTTPException(503, f"the task queue is unreachable ({type(e).__name__}); the job was "
                                     "cancelled, resubmit it later") from e
        SUBMITTED.labels(kind).inc(len(items))

    def submit_upload(self, job_id: str, image_id: str, labels: tuple[str, ...], data: bytes, rib: RibConfig,
                      owner: str) -> None:
        """Record the job first, then store the image, then queue it: with Redis down nothing is
        stored; with storage down the job ends failed with the reason instead of waiting forever."""
        key = upload_key(job_id, image_id)
        item = JobItem(image_id, self.storage.uri(key), labels)
        self.record(job_id, "upload", [item], rib, owner)
        try:
            self.storage.put(key, data)  # stored as opaque bytes, whatever type the client claimed
        except (OSError, BotoCoreError, ClientError) as e:
            self.fail_unstored(job_id, [image_id], e)
        self.queue(job_id, "upload", [item], rib)

    def link(self, key: str) -> dict[str, str]:
        return {"key": key, "uri": self.storage.uri(key),
                "url": self.storage.url(key, self.settings.presign_expires_s)}

    def results(self, job_id: str, offset: int, limit: int) -> dict[str, Any]:
        items = self.store.items(job_id, offset, limit)
        for it in items:
            files = {name: self.link(image_key(job_id, it["id"], name)) for name in it.pop("artifacts")}
            it["artifacts"] = files
            if files:
                refined = "irn" if "irn_mask.png" in files else "crf"
                it.update(map=files["map.npz"], mask=files[f"{refined}_mask.png"],
                          overlay=files[f"{refined}_overlay.png"])
        total = int(self.store.status(job_id, max_errors=0)["total"])
        end = offset + len(items)
        return {"job_id": job_id, "offset": offset, "limit": limit, "total": total,
                "next_offset": end if end < total else None, "items": items}


@cache
def service() -> Service:
    s = get_settings()
    s.export_s3_endpoint()
    store = JobStore.from_url(s.state_redis_url, s.job_ttl_s)
    broker = redis.Redis.from_url(s.broker_url)
    REGISTRY.register(RedisStatsCollector(store.stats, broker, [s.image_queue, s.training_queue]))
    return Service(s, store, s.storage(), broker)


class BodyLimit:
    """413 with a reason for request bodies over the limit: by Content-Length before reading, else while reading.

    A pure ASGI middleware: the body is never buffered here. FastAPI passes an HTTPException
    raised while it reads the body through to its handler, which answers with the JSON detail.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.detail = (f"the request body is over {limit} bytes "
                       f"(RIB_MAX_UPLOAD_BYTES + {MULTIPART_OVERHEAD} for the form); send a smaller file")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            await JSONResponse({"detail": self.detail}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, self.detail)
            return message

        await self.app(scope, limited, send)


settings = get_settings()
app = FastAPI(
    title="RIB pseudo-mask service",
    version=__version__,
    description="Pixel-level pseudo-masks from image-level class labels with RIB (NeurIPS 2021). "
                "Send the API key in the `X-API-Key` header.",
)
app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + MULTIPART_OVERHEAD)  # before any parsing
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="one of RIB_API_KEYS")


def _known_key(key: str | None, keys: Sequence[str]) -> bool:
    return bool(key) and any(hmac.compare_digest(key.encode(), k.encode()) for k in keys)


def require_api_key(key: Annotated[str | None, Depends(api_key_header)]) -> str:
    """The caller's identity: the digest of its key (jobs are stored with it, never with the key)."""
    keys = service().settings.api_keys
    if not keys:
        raise HTTPException(401, "this server has no API keys configured (set RIB_API_KEYS)")
    if not key:
        raise HTTPException(401, "missing API key: send it in the X-API-Key header")
    if not _known_key(key, keys):
        raise HTTPException(401, "wrong API key")
    return owner_of(key)


Owner = Annotated[str, Depends(require_api_key)]


v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@app.middleware("http")
async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Count every request by route and status, and time it."""
    started = time.perf_counter()
    response = await call_next(request)
    route = getattr(request.scope.get("route"), "path", "unmatched")
    if 400 <= response.status_code < 500 and response.status_code not in (401, 404):
        REJECTED.labels(str(response.status_code)).inc()
    REQUESTS.labels(request.method, route, str(response.status_code)).inc()
    LATENCY.labels(route).observe(time.perf_counter() - started)
    return response


@app.exception_handler(InputError)
async def input_error(request: Request, exc: InputError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@app.exception_handler(redis.ConnectionError)
@app.exception_handler(redis.TimeoutError)
async def redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
    """Only a Redis that cannot be reached is a 503; any other Redis error is a bug, and a 500."""
    return JSONResponse({"detail": f"the job store is unavailable ({type(exc).__name__}); retry later"},
                        status_code=503)


def _expected_body(request: Request) -> str | None:
    """The media type the matched route reads its body as, if it has a body."""
    route = request.scope.get("route")
    body = getattr(route, "body_field", None)
    if body is None:
        return None
    return "multipart/form-data" if isinstance(body.field_info, params.Form) else "application/json"


@app.exception_handler(RequestValidationError)
async def request_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own checks answer in the service's shape, and name a body of the wrong media type."""
    errors = [{"field": ".".join(str(p) for p in err["loc"][1:]) or str(err["loc"][0]), "error": err["msg"]}
              for err in exc.errors()]
    expected = _expected_body(request)
    sent = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if expected and sent != expected and any(err["loc"][0] == "body" for err in exc.errors()):
        detail = f"this endpoint reads a {expected} body; the request sent {sent or 'no Content-Type'}"
    else:
        detail = "invalid request: " + "; ".join(f"{e['field']}: {e['error']}" for e in errors[:5])
    return JSONResponse({"detail": detail, "errors": errors}, status_code=422)


# ------------------------------------------------------------------------------------------ health


@app.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


def _ready_checks(svc: Service) -> dict[str, Callable[[], object]]:
    """Each check raises (or returns False) when its part is not usable."""
    checks: dict[str, Callable[[], object]] = {
        "redis": svc.store.r.ping, "broker": svc.broker.ping,
        "storage": lambda: next(iter(svc.storage.list("jobs/")), True)}
    for name in ("classifier_uri", "companion_manifest_uri"):
        uri = getattr(svc.settings, name)
        checks[name] = partial(lambda u: bool(u) and uri_exists(u), uri)
    return checks


async def _check(fn: Callable[[], object], name: str, svc: Service) -> str:
    try:
        with anyio.fail_after(READY_TIMEOUT_S):  # the thread is abandoned, not waited for
            found = await anyio.to_thread.run_sync(fn, abandon_on_cancel=True)
    except TimeoutError:
        return f"no answer within {READY_TIMEOUT_S} s"
    except Exception as e:
        return f"unreachable: {type(e).__name__}: {e}"
    return "ok" if found else f"not found: {getattr(svc.settings, name, None)!r}"


@app.get("/readyz", tags=["health"])
async def readyz(key: Annotated[str | None, Depends(api_key_header)] = None) -> JSONResponse:
    """Redis (jobs and broker), the results store and the model files are reachable; each check
    gives up after READY_TIMEOUT_S. Why a check fails (addresses, URIs) is shown only with an API key."""
    svc = service()
    checks = _ready_checks(svc)
    results = await asyncio.gather(*(_check(fn, name, svc) for name, fn in checks.items()))
    ready = all(r == "ok" for r in results)
    if _known_key(key, svc.settings.api_keys):
        shown = dict(zip(checks, results, strict=True))
    else:
        shown = {name: "ok" if r == "ok" else "failing" for name, r in zip(checks, results, strict=True)}
    return JSONResponse({"ready": ready, "checks": shown}, status_code=200 if ready else 503)


@app.get("/metrics", tags=["health"], response_class=Response)
def metrics() -> Response:
    """Prometheus text format."""
    service()  # registers the Redis collector
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


# ------------------------------------------------------------------------------------------ images and jobs


def _accepted(job_id: str, extra: dict[str, Any] | None = None) -> JSONResponse:
    body = {"job_id": job_id, "state": "queued", **(extra or {}),
            "links": {"status": f"/v1/jobs/{job_id}", "results": f"/v1/jobs/{job_id}/results"}}
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})


def _job_or_404(job_id: str, owner: str) -> Service:
    """The service, once the job is in Redis and belongs to ``owner``. A job Redis lost but storage
    still holds is rebuilt first (its finished images from their files, the rest queued again).
    Another key's job is as unknown as one that never was: 404 either way."""
    svc = service()
    unknown = HTTPException(404, f"no job {job_id!r} (unknown, or expired after RIB_JOB_TTL_S)")
    if not svc.store.exists(job_id):
        todo = svc.store.restore(job_id, svc.storage)
        if todo is None:
            raise unknown
        if not svc.store.exists(job_id):
            raise HTTPException(503, f"job {job_id} is being rebuilt from storage; retry in a moment")
        send_chunks(job_id, todo, svc.store.rib(job_id))
        svc.store.finalize(job_id, svc.storage)
    if not svc.store.exists(job_id, owner):
        raise unknown
    return svc


@v1.post("/images", status_code=202, tags=["jobs"],
         responses={200: {"description": "finished within `wait`: the status and the results"},
                    202: {"description": "queued: poll the status link"}})
async def submit_image(
    file: Annotated[UploadFile, File(description="the image (PNG, JPEG, ...)")],
    labels: Annotated[list[str], Form(description="class names: repeat the field or separate them by commas")],
    owner: Owner,
    image_id: Annotated[str | None, Form(description="result folder name; default: the file name")] = None,
    rib: Annotated[str | None, Form(description="JSON object of RIB parameters overriding the defaults")] = None,
    wait: Annotated[float, Query(ge=0, le=60, description="seconds to wait for the result")] = 0,
) -> JSONResponse:
    """One image and its class names; returns a job id, or the result itself when it is ready within ``wait``.

    Async: a client waiting for its result holds no thread, so waiting uploads never stall the API.
    Blocking work (decoding, Redis, storage) runs in the thread pool.
    """
    svc = service()
    s = svc.settings
    data = await file.read(s.max_upload_bytes + 1)
    classes = await run_in_threadpool(svc.classes)
    image_id, names = check_upload(image_id or default_image_id(file.filename), parse_labels(labels), classes)
    params = rib_params(rib, s.rib_defaults, s.max_crop_size)
    await run_in_threadpool(decode_upload, data, s.max_upload_bytes, s.max_image_pixels)
    job_id = uuid.uuid4().hex
    await run_in_threadpool(svc.submit_upload, job_id, image_id, names, data, params, owner)
    deadline, delay = time.monotonic() + wait, 0.2
    while wait:
        status = await run_in_threadpool(svc.store.status, job_id)
        if status["state"] in FINISHED:
            results = await run_in_threadpool(svc.results, job_id, 0, 1)
            return JSONResponse({**status, "results": results}, status_code=200)
        if time.monotonic() >= deadline:
            break
        # Back off to one look a second: many waiting clients must not keep the thread pool busy.
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(1.0, delay * 1.5)
    return _accepted(job_id, {"image_id": image_id})


class JobRequest(BaseModel):
    """A bulk job: a manifest (``s3://...`` JSONL, the rib-manifest format) or an inline list of records."""

    model_config = ConfigDict(extra="forbid")

    manifest_uri: str | None = Field(None, description="s3:// URI of a JSONL manifest; relative paths resolve "
                                                       "against its folder")
    images: list[Any] | None = Field(None, description='inline records: {"id", "image" (s3:// URI), "labels"}')
    rib: dict[str, Any] = Field(default_factory=dict, description="RIB parameters overriding the defaults")


def _read_manifest(uri: str, s: Settings) -> str:
    """The manifest's text, its size checked before it is downloaded."""
    if err := uri_error(uri, s.input_prefixes):
        raise InputError(422, f"manifest_uri: {err}")
    try:
        size = uri_size(uri)
        if size > s.max_manifest_bytes:
            raise InputError(422, f"the manifest at {uri} is {size} bytes; the limit is {s.max_manifest_bytes} "
                                  "(RIB_MAX_MANIFEST_BYTES): split the job")
        return read_bytes(uri).decode("utf-8")
    except FileNotFoundError as e:
        raise InputError(422, f"no manifest at {uri}") from e
    except UnicodeDecodeError as e:
        raise InputError(422, f"the manifest at {uri} is not UTF-8 text") from e
    except ClientError as e:
        raise InputError(422, f"cannot read the manifest at {uri}: {e}") from e
    except BotoCoreError as e:
        raise HTTPException(503, f"the object store is unreachable: {e}") from e


@v1.post("/jobs", status_code=202, tags=["jobs"])
def submit_job(req: JobRequest, owner: Owner) -> JSONResponse:
    """Many images at once; they are processed in chunks by every worker on the image queue."""
    svc = service()
    s = svc.settings
    if (req.manifest_uri is None) == (req.images is None):
        raise InputError(422, "give exactly one of manifest_uri and images")
    params = rib_params(req.rib, s.rib_defaults, s.max_crop_size)
    if req.manifest_uri is not None:
        text = _read_manifest(req.manifest_uri, s)
        items = manifest_items(text, parent_uri(req.manifest_uri), svc.classes(), s.input_prefixes, s.max_job_images)
    else:
        items = inline_items(req.images or [], svc.classes(), s.input_prefixes, s.max_job_images)
    job_id = uuid.uuid4().hex
    svc.record(job_id, "bulk", items, params, owner)
    svc.queue(job_id, "bulk", items, params)
    return _accepted(job_id, {"total": len(items)})


@v1.get("/jobs/{job_id}", tags=["jobs"])
def job_status(job_id: str, owner: Owner) -> dict[str, Any]:
    """State, counts (queued, running, done, failed, skipped), per-image errors and timing."""
    return _job_or_404(job_id, owner).store.status(job_id)


@v1.get("/jobs/{job_id}/results", tags=["jobs"])
def job_results(job_id: str, owner: Owner, offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    """Per image: status, storage keys and presigned URLs of the map, the pseudo-mask, the overlay and the rest."""
    return _job_or_404(job_id, owner).results(job_id, offset, limit)


@v1.delete("/jobs/{job_id}", tags=["jobs"])
def cancel_job(job_id: str, owner: Owner) -> dict[str, Any]:
    """Skip every image not started yet; images already running finish and are kept whole."""
    svc = _job_or_404(job_id, owner)
    state = svc.store.status(job_id)["state"]
    if state in ("done", "failed"):
        raise HTTPException(409, f"job {job_id} already finished ({state}); nothing to cancel")
    svc.store.cancel(job_id)
    svc.store.finalize(job_id, svc.storage)
    return svc.store.status(job_id)


# ------------------------------------------------------------------------------------------ training jobs


class TrainingJobRequest(BaseModel):
    """An offline DeepLab job on the training queue (``rib_core.train_deeplab.run_training_job``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["train", "evaluate", "predict"]
    manifest: str = Field(description="s3:// URI of a manifest (pseudo-masks to train on, or images to score)")
    output: str = Field(description="s3:// prefix for checkpoints, reports or predictions")
    checkpoint: str | None = Field(None, description="DeepLab checkpoint for evaluate and predict")
    evaluate_on: str | None = Field(None, description="train: s3:// manifest with ground truth to evaluate and "
                                                      "predict once trained")
    config: DeepLabTrainConfig = Field(default_factory=DeepLabTrainConfig,
                                       description="DeepLab settings (rib_core.train_deeplab.DeepLabTrainConfig)")


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


@v1.post("/training-jobs", status_code=202, tags=["training"])
def submit_training(req: TrainingJobRequest, owner: Owner) -> JSONResponse:
    svc = service()
    if errors := _location_errors(req, svc.settings):
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
    spec = req.model_dump(exclude_none=True)
    svc.store.create_training(job_id, spec, owner)
    celery_app.send_task(TRAINING_JOB, args=[spec], queue=svc.settings.training_queue, task_id=job_id)
    return JSONResponse({"job_id": job_id, "state": "queued", "links": {"status": f"/v1/training-jobs/{job_id}"}},
                        status_code=202, headers={"Location": f"/v1/training-jobs/{job_id}"})


@v1.get("/training-jobs/{job_id}", tags=["training"])
def training_status(job_id: str, owner: Owner) -> dict[str, Any]:
    record = service().store.training(job_id, owner)
    if record is None:
        raise HTTPException(404, f"no training job {job_id!r}")
    result = AsyncResult(job_id, app=celery_app)
    state = TRAINING_STATES.get(result.state, result.state.lower())
    body = {"job_id": job_id, "state": state, **record}
    if state == "done":
        body["result"] = result.result
    elif state == "failed":
        body["error"] = f"{type(result.result).__name__}: {result.result}"
    return body


app.include_router(v1)
