"""``/healthz`` (the process is up), ``/readyz`` (its parts are usable) and ``/metrics``; no API key needed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from contract.pipelines import PipelineStore
from contract.settings import Settings
from contract.worker_reports import classifier
from rib_core.io.storage import uri_exists
from service.deps import BrokerDep, SettingsDep, StorageDep, StoreDep, api_key_header, known_key
from service.metrics import REGISTRY
from service.schemas import ClassifierInfo, Health, Readiness

READY_TIMEOUT_S = 2.0  # /readyz: each check answers within this or counts as failing

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


async def _timed(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a thread, given up after READY_TIMEOUT_S (the thread is abandoned, not waited for)."""
    with anyio.fail_after(READY_TIMEOUT_S):
        return await anyio.to_thread.run_sync(fn, abandon_on_cancel=True)


async def _check(fn: Callable[[], object], name: str, settings: Settings) -> str:
    try:
        found = await _timed(fn)
    except TimeoutError:
        return f"no answer within {READY_TIMEOUT_S} s"
    except Exception as e:
        return f"unreachable: {type(e).__name__}: {e}"
    return "ok" if found else f"not found: {getattr(settings, name, None)!r}"


async def _classifier(store: PipelineStore, settings: Settings) -> ClassifierInfo:
    """The configured classifier, with what a worker recorded of it (its validation mAP) when a
    worker has read this very checkpoint."""
    try:
        recorded = await _timed(partial(classifier, store.r)) or {}
    except Exception:
        recorded = {}
    if recorded.get("uri") != settings.classifier_uri:
        recorded = {}
    return ClassifierInfo.model_validate({**recorded, "uri": settings.classifier_uri})


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "not ready"}})
async def readyz(settings: SettingsDep, store: StoreDep, storage: StorageDep, broker: BrokerDep,
                 key: Annotated[str | None, Depends(api_key_header)] = None) -> JSONResponse:
    """Redis (jobs and broker), the results store and the model files are reachable; each check
    gives up after READY_TIMEOUT_S. Why a check fails (addresses, URIs) and the classifier the
    workers serve (its URI and recorded validation mAP) are shown only with an API key."""
    checks: dict[str, Callable[[], object]] = {
        "redis": store.r.ping, "broker": broker.ping, "storage": lambda: next(iter(storage.list("jobs/")), True)}
    for name in ("classifier_uri", "companion_manifest_uri"):
        checks[name] = partial(lambda u: bool(u) and uri_exists(u), getattr(settings, name))
    results = await asyncio.gather(*(_check(fn, name, settings) for name, fn in checks.items()))
    ready = all(r == "ok" for r in results)
    body = Readiness(ready=ready, checks=dict(zip(checks, results, strict=True)))
    if known_key(key, settings.api_keys):
        if body.checks["redis"] == "ok":
            body.classifier = await _classifier(store, settings)
        else:
            body.classifier = ClassifierInfo(uri=settings.classifier_uri)
    else:
        body.checks = {name: "ok" if r == "ok" else "failing" for name, r in body.checks.items()}
    shown = body.model_dump(exclude={"classifier"} if body.classifier is None else set())
    return JSONResponse(shown, status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text format"}})
def metrics(request: Request) -> Response:
    """Prometheus text format: the API's own counters, and the workers' counters and queue depths from Redis."""
    text = generate_latest(REGISTRY) + generate_latest(request.app.state.redis_metrics)
    return Response(text, media_type=CONTENT_TYPE_LATEST)
