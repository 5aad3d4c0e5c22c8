"""Recording, storing and queueing a job, and reading it back: the steps every job route shares.

One submit policy for every kind of job (all are staged jobs, one store's): what a job was asked
is stored (signed) before anything is queued, its first units are sent by the store's one decision
(:func:`send_next`), and a broker that refuses them cancels the job (:func:`queued`: 503, resubmit
later). An image job is recorded in Redis first, then its request (and upload) stored: with Redis
down nothing is stored, with storage down the job ends failed with the reason instead of waiting
forever. A pipeline or training job is stored first (:func:`stored`: with storage down nothing is
recorded or queued), then recorded and queued (:func:`submit_staged`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from botocore.exceptions import BotoCoreError, ClientError
from fastapi import Depends, HTTPException
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from contract.job_kinds import JobPlan
from contract.job_requests import ImageJobSpec, JobItem, SubmittedManifest, save_request
from contract.pipelines import PipelineStore
from contract.records import Records
from contract.settings import Settings
from contract.tasks import FAN_OUT_INLINE, TaskQueue
from rib_core.config.rib_config import RibConfig
from rib_core.config.stage_configs import RefineConfig
from rib_core.io.artifacts import final_files, image_key, upload_key
from rib_core.io.storage import Storage
from service.deps import QueueDep, SettingsDep, StorageDep, StoreDep
from service.metrics import SUBMITTED
from service.schemas import JobAccepted

STORAGE_ERRORS = (OSError, BotoCoreError, ClientError)
FINISHED = ("done", "failed", "cancelled")  # a job's terminal states
T = TypeVar("T")


def stored(write: Callable[[], T]) -> T:
    """``write()``: what a job was asked, kept in storage before anything of it is queued; 503 when
    storage refuses (nothing was queued)."""
    try:
        return write()
    except STORAGE_ERRORS as e:
        raise HTTPException(503, f"the results store is unreachable ({type(e).__name__}); nothing was queued, "
                                 "submit the job again later") from e


def queued(send: Callable[[], None], cancel: Callable[[], None]) -> None:
    """``send()`` a recorded job's messages; a broker failure ``cancel()``-s the job instead of
    half-queueing it (503)."""
    try:
        send()
    except Exception as e:
        cancel()
        raise HTTPException(503, f"the task queue is unreachable ({type(e).__name__}); the job was "
                                 "cancelled, resubmit it later") from e


def send_next(job_id: str, spec: JobPlan, store: PipelineStore, queue: TaskQueue, settings: Settings) -> None:
    """Send what a staged job runs next, at most FAN_OUT_INLINE units from a request (the tasks and
    the reaper send the rest)."""
    queue.send_pipeline(job_id, store.advance(job_id, spec, settings.visibility_timeout_s, FAN_OUT_INLINE))


def submit_staged(job_id: str, spec: JobPlan, store: PipelineStore, records: Records, queue: TaskQueue,
                  settings: Settings) -> None:
    """Record a staged job whose spec is stored, and queue its first units."""
    store.create(job_id, spec)
    queued(lambda: send_next(job_id, spec, store, queue, settings), lambda: store.cancel(job_id, records.storage))


def find_staged(job_id: str, owner: str, store: PipelineStore, records: Records, queue: TaskQueue,
                settings: Settings) -> None:
    """Raise 404 unless ``job_id`` is the caller's job (of ``store``'s kind); a job Redis lost is
    rebuilt from its signed record in storage first (503 while another process rebuilds it) and
    what it needs next is sent. Another key's job is as unknown as one that never was."""
    what = "job" if store.kind.per_image else f"{store.kind.name} job"
    unknown = HTTPException(404, f"no {what} {job_id!r} (unknown, or expired after RIB_JOB_TTL_S)")
    if not store.exists(job_id):
        spec = store.restore(job_id, records)
        if spec is None or not store.exists(job_id):
            if store.rebuilding(job_id):
                raise HTTPException(503, f"job {job_id} is being rebuilt from storage; retry in a moment")
            raise unknown
        send_next(job_id, spec, store, queue, settings)
    if not store.exists(job_id, owner):
        raise unknown


def accepted(job_id: str, **extra: Any) -> JSONResponse:
    """202 with the job's links and a Location header."""
    body = JobAccepted.model_validate({"job_id": job_id, "state": "queued", **extra,
                                       "links": {"status": f"/v1/jobs/{job_id}",
                                                 "results": f"/v1/jobs/{job_id}/results"}})
    return JSONResponse(body.model_dump(exclude_none=True), status_code=202,
                        headers={"Location": f"/v1/jobs/{job_id}"})


@dataclass
class Jobs:
    """A request's view of the image jobs' store, the results store and the task queue."""

    settings: Settings
    store: PipelineStore
    storage: Storage
    queue: TaskQueue

    @property
    def records(self) -> Records:
        return Records(self.storage, self.settings.signing_key())

    def record(self, job_id: str, spec: ImageJobSpec, manifest: SubmittedManifest | None = None) -> None:
        """Record the job in Redis, then keep the request (and the ``manifest`` its items came from) in
        storage, so that a job Redis loses can be rebuilt from it; with storage down the job ends
        failed (:meth:`fail_unstored`)."""
        self.store.create(job_id, spec)
        try:
            save_request(self.records, job_id, spec, manifest)
        except STORAGE_ERRORS as e:
            self.fail_unstored(job_id, [it.id for it in spec.items], e)

    def fail_unstored(self, job_id: str, image_ids: Sequence[str], error: Exception) -> None:
        """Storage refused a recorded job's input: its images end failed with the reason (a terminal
        state, never a job that waits forever), and the client is told to submit again."""
        for image_id in image_ids:
            self.store.mark_failed(job_id, image_id, f"the job's input could not be stored ({type(error).__name__})")
        raise HTTPException(503, f"the results store is unreachable ({type(error).__name__}); job {job_id} "
                                 "is marked failed, submit it again later") from error

    def submit(self, job_id: str, kind: str, items: Sequence[JobItem], rib: RibConfig, refine: RefineConfig,
               owner: str, callback_url: str | None = None, uploads: Mapping[str, bytes] | None = None,
               manifest: SubmittedManifest | None = None) -> None:
        """Record the job first, then store its uploaded images (``uploads``: image id -> bytes, for the
        items made by :meth:`upload_item`), then send its first chunks (a broker failure cancels the
        job instead of half-queueing it). ``manifest``: what the items were read from."""
        spec = ImageJobSpec(kind, items, rib.model_dump(mode="json"), refine.model_dump(mode="json"),
                            self.settings.chunk_size, owner, callback_url)
        self.record(job_id, spec, manifest)
        for image_id, data in (uploads or {}).items():
            try:
                self.storage.put(upload_key(job_id, image_id), data)  # opaque bytes, whatever type was claimed
            except STORAGE_ERRORS as e:
                self.fail_unstored(job_id, [it.id for it in items], e)
        queued(lambda: send_next(job_id, spec, self.store, self.queue, self.settings),
               lambda: self.store.cancel(job_id, self.storage))
        SUBMITTED.labels(kind).inc(len(items))

    def upload_item(self, job_id: str, image_id: str, labels: tuple[str, ...]) -> JobItem:
        """The item of an image the API stores itself (:meth:`submit`'s ``uploads``)."""
        return JobItem(image_id, self.storage.uri(upload_key(job_id, image_id)), labels)

    def submit_upload(self, job_id: str, image_id: str, labels: tuple[str, ...], data: bytes, rib: RibConfig,
                      refine: RefineConfig, owner: str, callback_url: str | None = None) -> None:
        """One uploaded image as a job of its own."""
        self.submit(job_id, "upload", [self.upload_item(job_id, image_id, labels)], rib, refine, owner, callback_url,
                    {image_id: data})

    async def wait(self, job_id: str, seconds: float) -> dict[str, Any] | None:
        """The job's status once it is finished, or None when it is not within ``seconds``.

        Async: a waiting client holds no thread, so waiting requests never stall the API; the
        look-ups run in the thread pool and back off to one a second."""
        deadline, delay = time.monotonic() + seconds, 0.2
        while True:
            status = await run_in_threadpool(self.store.status, job_id)
            if status["state"] in FINISHED:
                return status
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(1.0, delay * 1.5)

    def find(self, job_id: str, owner: str) -> None:
        """Raise 404 unless the job is the caller's (:func:`find_staged`: a job Redis lost but storage
        still holds is rebuilt first, its finished images from their files, the rest queued again)."""
        find_staged(job_id, owner, self.store, self.records, self.queue, self.settings)

    def link(self, key: str) -> dict[str, str]:
        return {"key": key, "uri": self.storage.uri(key),
                "url": self.storage.url(key, self.settings.presign_expires_s)}

    def results(self, job_id: str, offset: int, limit: int) -> dict[str, Any]:
        items = self.store.items(job_id, offset, limit)
        for it in items:
            it["artifacts"] = {name: self.link(image_key(job_id, it["id"], name)) for name in it.pop("artifacts")}
            it.update({role: it["artifacts"][name] for role, name in final_files(it["artifacts"]).items()})
        total = int(self.store.status(job_id, max_errors=0)["total"])
        end = offset + len(items)
        return {"job_id": job_id, "offset": offset, "limit": limit, "total": total,
                "next_offset": end if end < total else None, "items": items}


def jobs(settings: SettingsDep, store: StoreDep, storage: StorageDep, queue: QueueDep) -> Jobs:
    return Jobs(settings, store, storage, queue)


JobsDep = Annotated[Jobs, Depends(jobs)]
