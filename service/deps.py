"""What the routes depend on, as FastAPI dependencies: settings, the job stores, the results store,
the task queue, the broker, the model's class names and the caller's identity.

:func:`service.main.create_app` builds the clients once (:class:`Clients`, in ``app.state``); each
dependency hands out one part of them, so that a test swaps any part through
``app.dependency_overrides`` (another Redis, another bucket) without touching the rest.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated

import redis
from botocore.exceptions import BotoCoreError
from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader

from contract.job_kinds import IMAGE, TRAINING
from contract.pipelines import PipelineStore
from contract.records import Records
from contract.settings import Settings
from contract.stores import owner_of
from contract.tasks import TaskQueue
from rib_core.data.datasets import load_manifest
from rib_core.io.storage import Storage, uri_exists
from service.validation import Locations


@dataclass
class Clients:
    """The API's clients, created once per app by its factory."""

    settings: Settings
    store: PipelineStore  # image jobs; the other kinds' stores share its Redis client
    storage: Storage
    broker: redis.Redis
    queue: TaskQueue
    classes: list[str] = field(default_factory=list)  # read from the companion manifest on first use

    @classmethod
    def connect(cls, settings: Settings) -> Clients:
        settings.export_s3_endpoint()
        return cls(settings, PipelineStore.from_url(settings.state_redis_url, settings.job_ttl_s, IMAGE),
                   settings.storage(),
                   redis.Redis.from_url(settings.broker_url), TaskQueue(settings))


def clients(request: Request) -> Clients:
    return request.app.state.clients


def app_settings(c: Annotated[Clients, Depends(clients)]) -> Settings:
    return c.settings


def job_store(c: Annotated[Clients, Depends(clients)]) -> PipelineStore:
    return c.store


def result_storage(c: Annotated[Clients, Depends(clients)]) -> Storage:
    return c.storage


def task_queue(c: Annotated[Clients, Depends(clients)]) -> TaskQueue:
    return c.queue


def broker(c: Annotated[Clients, Depends(clients)]) -> redis.Redis:
    return c.broker


def model_classes(c: Annotated[Clients, Depends(clients)]) -> list[str]:
    """The model's class names, from the companion manifest's header (read on first use)."""
    if not c.classes:
        uri = c.settings.companion_manifest_uri
        if not uri:
            raise HTTPException(503, "the service has no model configured (RIB_COMPANION_MANIFEST_URI)")
        try:
            c.classes = load_manifest(uri, verify_files=False).classes
        except Exception as e:
            raise HTTPException(503, f"the service cannot read its companion manifest {uri}: {e}") from e
    return c.classes


SettingsDep = Annotated[Settings, Depends(app_settings)]
StoreDep = Annotated[PipelineStore, Depends(job_store)]


def pipeline_store(store: StoreDep) -> PipelineStore:
    """Pipeline jobs, on the job store's Redis."""
    return PipelineStore(store.r, store.ttl_s)


def training_store(store: StoreDep) -> PipelineStore:
    """Training jobs (jobs of one stage), on the job store's Redis."""
    return PipelineStore(store.r, store.ttl_s, kind=TRAINING)


PipelinesDep = Annotated[PipelineStore, Depends(pipeline_store)]
TrainingsDep = Annotated[PipelineStore, Depends(training_store)]
StorageDep = Annotated[Storage, Depends(result_storage)]
QueueDep = Annotated[TaskQueue, Depends(task_queue)]
BrokerDep = Annotated[redis.Redis, Depends(broker)]
ClassesDep = Annotated[list[str], Depends(model_classes)]

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="one of RIB_API_KEYS")


def known_key(key: str | None, keys: Sequence[str]) -> bool:
    return bool(key) and any(hmac.compare_digest(key.encode(), k.encode()) for k in keys)


def require_api_key(key: Annotated[str | None, Depends(api_key_header)], settings: SettingsDep) -> str:
    """The caller's identity: the digest of its key (jobs are stored with it, never with the key)."""
    if not settings.api_keys:
        raise HTTPException(401, "this server has no API keys configured (set RIB_API_KEYS)")
    if not key:
        raise HTTPException(401, "missing API key: send it in the X-API-Key header")
    if not known_key(key, settings.api_keys):
        raise HTTPException(401, "wrong API key")
    return owner_of(key)


Owner = Annotated[str, Depends(require_api_key)]


def records(settings: SettingsDep, storage: StorageDep) -> Records:
    """The job records this service signs (``request.json``, ``pipeline.json``, ``training.json``)."""
    return Records(storage, settings.signing_key())


RecordsDep = Annotated[Records, Depends(records)]


def _present(uri: str) -> bool:
    try:
        return uri_exists(uri)
    except BotoCoreError as e:
        raise HTTPException(503, f"the object store is unreachable ({type(e).__name__}); retry later") from e


def locations(owner: Owner, settings: SettingsDep, store: StoreDep) -> Locations:
    """The caller's view of where a request may read (:class:`service.validation.Locations`): its
    own jobs' files under the results prefix, by their Redis records (image, pipeline and training
    jobs)."""
    stores = (store, pipeline_store(store), training_store(store))

    def owns(job_id: str) -> bool:
        return any(jobs.exists(job_id, owner) for jobs in stores)

    return Locations(settings.input_prefixes, settings.results_prefix, owns, _present)


LocationsDep = Annotated[Locations, Depends(locations)]
