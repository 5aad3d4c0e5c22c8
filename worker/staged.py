"""What the tasks of staged jobs (pipeline, training and image jobs) share in a worker process: each kind's
store, signed records and queue (:class:`Pipelines`), and the frozen inputs, read once per process."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any

import redis

from contract.job_kinds import PIPELINE, JobKind, JobPlan
from contract.pipelines import PipelineStore
from contract.records import Records, UntrustedRecordError
from contract.settings import Settings
from contract.stages import PipelineSpec
from contract.tasks import TaskQueue
from rib_core.data.datasets import Manifest, parse_manifest
from rib_core.io.artifacts import PIPELINE_MANIFEST, pipeline_key
from rib_core.io.storage import Storage
from worker.celery_app import app
from worker.tasks import runtime

log = logging.getLogger(__name__)
OUTAGE_WAIT_S = 600  # how long a task's Redis write waits out an outage (a restart) before giving up
SPECS_KEPT = 64      # specs a process keeps (Pipelines.specs)


class CancelledError(Exception):
    """The job was cancelled while this stage ran."""


@dataclass
class Pipelines:
    """What the tasks of one kind of staged job (pipeline or training jobs) and its reaper work with:
    the job store, the signed records, the queue."""

    store: PipelineStore
    records: Records
    queue: TaskQueue
    settings: Settings
    # Specs read and verified so far, by job (a spec never changes once signed): every chunk of a
    # job, and every reaper round, would otherwise fetch its signed record (a pipeline's holds the
    # ids of the whole data set).
    specs: dict[str, JobPlan] = field(default_factory=dict)

    @classmethod
    def connect(cls, settings: Settings, kind: JobKind = PIPELINE, client: redis.Redis | None = None,
                storage: Storage | None = None) -> Pipelines:
        client = client or redis.Redis.from_url(settings.state_redis_url, decode_responses=True)
        store = PipelineStore(client, settings.job_ttl_s, OUTAGE_WAIT_S, kind)
        return cls(store, Records(storage or settings.storage(), settings.signing_key()), TaskQueue(settings, app),
                   settings)

    def spec(self, job_id: str) -> JobPlan:
        """The job's spec (a :class:`PipelineSpec`, a :class:`contract.training.TrainingSpec` or a
        :class:`contract.job_requests.ImageJobSpec`)."""
        if job_id not in self.specs:
            if len(self.specs) >= SPECS_KEPT:
                self.specs.pop(next(iter(self.specs)))
            self.specs[job_id] = self.store.read_spec(job_id, self.records)
        return self.specs[job_id]

    def advance(self, job_id: str, spec: JobPlan) -> None:
        """Send what runs next (the one decision: :meth:`PipelineStore.advance`)."""
        self.queue.send_pipeline(job_id, self.store.advance(job_id, spec, self.settings.visibility_timeout_s))

    def ensure(self, job_id: str) -> JobPlan | None:
        """The job's spec, its Redis record rebuilt from storage first when Redis lost it (then what it
        needs next is sent). None when storage has no job the service wrote by that id."""
        if self.store.exists(job_id):
            try:
                return self.spec(job_id)
            except (FileNotFoundError, UntrustedRecordError):
                return None
        spec = self.store.restore(job_id, self.records)
        if spec is not None:
            log.warning("job %s: rebuilt from storage (Redis had lost it)", job_id)
            self.advance(job_id, spec)
        return spec

    def reap(self) -> None:
        """The reaper's round: send again every unit whose delivery died or whose message was lost,
        and advance the jobs whose finishing task died before it did."""
        for job_id in self.store.active():
            try:
                spec = self.spec(job_id)
            except (FileNotFoundError, UntrustedRecordError) as e:
                self.store.fail_open(job_id, f"the job's record in storage is unusable: {e}")
                continue
            self.advance(job_id, spec)


@cache
def pipes(kind: JobKind = PIPELINE) -> Pipelines:
    """This worker process's, for jobs of ``kind``, on the process's own clients (the tasks')."""
    rt = runtime()
    return Pipelines.connect(rt.settings, kind, rt.r, rt.storage)


@lru_cache(maxsize=4)
def frozen_text(key: str, digest: str) -> str:
    """A job's frozen input, read once per worker process and checked against its digest."""
    return pipes().records.get_frozen(key, digest).decode()


def frozen_manifest(job_id: str, spec: PipelineSpec) -> Manifest:
    """The data set as validated at submit (every location absolute), whatever the user's files are
    now; parsed once per worker process, so every chunk shares it (and its companion pool)."""
    return _parsed(pipeline_key(job_id, PIPELINE_MANIFEST), spec.manifest_sha256)


@lru_cache(maxsize=4)
def _parsed(key: str, digest: str) -> Manifest:
    return parse_manifest(frozen_text(key, digest))


def show_progress(job_id: str, stage: str, **values: Any) -> None:
    """Show a training stage's progress; stop it (:class:`CancelledError`) if the job was cancelled."""
    store = pipes().store
    store.progress(job_id, stage, **values)
    if store.cancelled(job_id):
        raise CancelledError(f"cancelled at {values}")
