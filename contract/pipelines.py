"""Every job's state, shared by the API and the workers, one state machine for pipeline jobs (a
whole data set through the paper's chain), training jobs (one stage) and image jobs (an upload or
a bulk job: one stage, ``images``, run in chunks, each image's state kept too:
:class:`contract.image_jobs.ImageProgress`).

A job runs its stages (:data:`contract.stages.STAGES`, the one registry, with each stage's task and
queue) one after the other; a chunked stage (maps, images) as one message per chunk of images.
There is no Celery canvas: every decision of what runs next is :meth:`PipelineStore.advance`'s,
made from the job's state, and a unit (a stage or a chunk) is done exactly once in Redis (a
chunked stage by the chunk whose count completes it: ``count_chunk.lua``, the single completion
decision).

What the job was asked is its spec (:class:`PipelineSpec` in ``jobs/<id>/pipeline/pipeline.json``,
:class:`contract.training.TrainingSpec` in ``jobs/<id>/training/training.json``,
:class:`contract.job_requests.ImageJobSpec` from ``jobs/<id>/request.json``), signed by the
service, with its inputs frozen beside it (the validated records, every location absolute); a task
carries only the job id and its unit. Delivery is at-least-once:

- a *lease* (a Redis key with a time to live, renewed by a heartbeat) lets one copy of a unit run;
  a copy delivered while another holds it is dropped;
- every delivery that starts counts an *attempt*; past ``RIB_MAX_STAGE_ATTEMPTS`` (``RIB_MAX_ATTEMPTS``
  for an image job's chunk; deliveries whose worker died: killed, out of memory, past the chunk
  time limit) the unit fails with that reason (a chunk's images not finished), and the message is
  dropped (dead-lettered);
- a unit whose worker died (running, lease gone) or whose message was lost is sent again by the
  *reaper* (:meth:`PipelineStore.due`, in every worker), which also advances jobs whose finishing
  task died between its result and the next stage;
- every write a worker makes waits out a Redis outage, and none recreates a job Redis lost: a job
  lost (a wipe, a restart without its append-only file) is rebuilt from storage (:meth:`restore`:
  stages from their reports, chunks from their markers, images from their files) by the next task
  or ``GET`` that meets it.

Every job ends ``done``, ``failed`` (a stage failed: its error is shown; an image job whose images
all failed) or ``cancelled``.
"""


from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import redis

from contract.image_jobs import ImageProgress
from contract.job_kinds import PIPELINE, JobKind, JobPlan
from contract.job_status import staged_body
from contract.lua import script
from contract.records import Records, UntrustedRecordError
from contract.stages import FINISHED, STAGE, Send, chunked_stage
from contract.stores import JOB_ID
from contract.webhooks import notify_finished
from rib_core.io.artifacts import PIPELINE_CANCELLED, chunk_marker, stage_marker
from rib_core.io.storage import Storage


class PipelineStore(ImageProgress):
    """The Redis record of every staged job of one ``kind`` (pipeline, training or image jobs):
    ``<prefix>:<id>`` (a hash: owner, callback, stages, cancel flag, per stage
    ``<stage>.state|started|finished|error|progress|report``), per unit its attempts, start and send
    times (``...:units``), the images without a map (``...:map_failures``), the leases
    (``...:lease:<unit>``) and, for an image job, its images (:class:`ImageProgress`).
    ``patience_s``: how long a call waits out a Redis outage (the workers wait; the API answers 503
    at once)."""

    def __init__(self, client: redis.Redis, ttl_s: int = 7 * 24 * 3600, patience_s: float = 0.0,
                 kind: JobKind = PIPELINE) -> None:
        super().__init__(client, kind.prefix, ttl_s, patience_s)
        self.kind = kind
        self._update = client.register_script(script("update"))
        self._start = client.register_script(script("start"))
        self._chunk_done = client.register_script(script("count_chunk", "chunk_done"))
        self._mark_queued = client.register_script(script("mark_queued"))

    @classmethod
    def from_url(cls, url: str, ttl_s: int = 7 * 24 * 3600, kind: JobKind = PIPELINE) -> PipelineStore:
        return cls(redis.Redis.from_url(url, decode_responses=True), ttl_s, kind=kind)

    def _set(self, job_id: str, **fields: Any) -> bool:
        """Write fields of a job Redis has; False (nothing written) when it has not."""
        args: list[Any] = [self.ttl_s]
        for k, v in fields.items():
            args += [k, v if isinstance(v, str) else json.dumps(v)]
        return bool(self._call(lambda: self._update(keys=[self.key(job_id)], args=args)))

    # ---------------------------------------------------------------- lifecycle
    def create(self, job_id: str, spec: JobPlan) -> None:
        fields: dict[str, Any] = {"owner": spec.owner, "created_at": time.time(), "stages": spec.stages(),
                                  "total": spec.total, "chunks": len(spec.chunks), "chunks_done": 0,
                                  "request": self.kind.shown(spec)}
        if spec.callback_url:
            fields["callback_url"] = spec.callback_url
        if self.kind.per_image:
            fields.update(self.image_fields(spec))  # type: ignore[arg-type]
        for stage in spec.stages():
            fields[f"{stage}.state"] = "skipped" if stage in spec.skipped() else "pending"
        mapping = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}

        def write() -> None:
            with self.r.pipeline() as pipe:
                pipe.hset(self.key(job_id), mapping=mapping)
                pipe.expire(self.key(job_id), self.ttl_s)
                if self.kind.per_image:
                    self.write_items(pipe, job_id, spec)  # type: ignore[arg-type]
                pipe.sadd(self.kind.active_key, job_id)
                pipe.execute()

        self._call(write)

    def read_spec(self, job_id: str, records: Records) -> JobPlan:
        """The job's spec, from its signed record in storage: FileNotFoundError without one,
        UntrustedRecordError when the service did not write it."""
        return self.kind.parse(records.get(self.kind.folder(job_id, self.kind.record)), records)

    def restore(self, job_id: str, records: Records) -> JobPlan | None:
        """Rebuild a job Redis no longer has from storage: its signed record (a record the service did
        not write is never adopted), stages whose report is stored done, chunks whose marker is
        stored counted, an image job's images whose files are stored done, a job cancelled before
        cancelled. Returns its spec (the caller then :meth:`advance`-s it), or None when storage
        has no such job, or another process is rebuilding it (:meth:`rebuilding`)."""
        if not JOB_ID.fullmatch(job_id):
            return None
        try:
            spec = self.read_spec(job_id, records)
        except (FileNotFoundError, UntrustedRecordError):
            return None
        if not self._call(lambda: self.r.set(self.key(job_id, "restoring"), 1, nx=True, ex=60)):
            return None
        if self.exists(job_id):
            return spec
        self.create(job_id, spec)
        storage = records.storage
        if self.kind.per_image:
            self.restore_images(job_id, storage)
        for stage in spec.stages():
            if not self.kind.per_image and storage.exists(marker := self.kind.folder(job_id, stage_marker(stage))):
                self.finish(job_id, stage, "done", json.loads(storage.get(marker)))
        chunked = chunked_stage(spec.stages())
        if chunked and not self.kind.per_image and self.stage_state(job_id, chunked) not in FINISHED:
            for n in range(len(spec.chunks)):
                if storage.exists(marker := self.kind.folder(job_id, chunk_marker(chunked, n))):
                    self.count_chunk(job_id, spec, Send(chunked, n), json.loads(storage.get(marker))["failures"],
                                     storage, keep=False)
        if storage.exists(self.kind.folder(job_id, PIPELINE_CANCELLED)):
            self._cancelled(job_id, spec.stages(), storage)
        return spec

    def stage_state(self, job_id: str, stage: str) -> str:
        return self._call(lambda: self.r.hget(self.key(job_id), f"{stage}.state")) or "pending"

    def start(self, job_id: str, send: Send, max_attempts: int) -> str:
        """One delivery of ``send``'s unit begins: ``run``, ``finished``, ``missing`` or ``dead``
        (``start.lua``)."""
        return str(self._call(lambda: self._start(keys=[self.key(job_id), self.key(job_id, "units")],
                                                  args=[send.unit, send.stage, time.time(), max_attempts])))

    def progress(self, job_id: str, stage: str, **values: Any) -> None:
        self._set(job_id, **{f"{stage}.progress": values})

    def finish(self, job_id: str, stage: str, state: str, report: dict[str, Any] | None = None,
               error: str | None = None) -> bool:
        fields: dict[str, Any] = {f"{stage}.state": state, f"{stage}.finished": time.time()}
        if report is not None:
            fields[f"{stage}.report"] = report
        if error is not None:
            fields[f"{stage}.error"] = error[:2000]
        return self._set(job_id, **fields)

    def count_chunk(self, job_id: str, spec: JobPlan, send: Send, failures: dict[str, str], storage: Storage,
                    keep: bool = True) -> int:
        """Count a finished chunk once, its marker kept in storage first (``keep``; a rebuilt job counts
        it; an image job's images are their own markers): 1 when it completed its stage (whose
        report is then kept), 0 otherwise, -1 when Redis lost the job."""
        if keep and not self.kind.per_image:
            storage.put(self.kind.folder(job_id, chunk_marker(send.stage, send.chunk or 0)),
                        json.dumps({"failures": failures}).encode(), "application/json")
        counted = self.chunk_done(job_id, send, failures, len(spec.chunks))
        if counted == 0 and self.kind.per_image and self.accounted(job_id):
            counted = int(self.settle(job_id, send.stage))  # another chunk's worker died after its last image
        if counted == 1:
            self._complete(job_id, send.stage, storage)
        return counted

    def chunk_done(self, job_id: str, send: Send, failures: dict[str, str], chunks: int) -> int:
        """Count ``send``'s chunk in Redis once (``chunk_done.lua``): 1 when it completed its stage
        (now done), 0 otherwise, -1 when Redis lost the job."""
        args: list[Any] = [send.stage, send.chunk, chunks, time.time(), self.ttl_s]
        for image_id, error in failures.items():
            args += [image_id, error[:500]]
        keys = [self.key(job_id), self.key(job_id, "units"), self.key(job_id, "map_failures")]
        return int(self._call(lambda: self._chunk_done(keys=keys, args=args)))

    def _complete(self, job_id: str, stage: str, storage: Storage) -> None:
        """A chunked stage is done (its last chunk counted): keep its report (an image job's index)."""
        if self.kind.per_image:
            self._set(job_id, **{f"{stage}.report": self.write_index(job_id, storage)})
            return
        images = int(self._call(lambda: self.r.hget(self.key(job_id), "total")) or 0)
        report = {"images": images, "maps": images - len(self.map_failures(job_id))}
        storage.put(self.kind.folder(job_id, stage_marker(stage)), json.dumps(report).encode(), "application/json")
        self.finish(job_id, stage, "done", report)

    def cancel(self, job_id: str, storage: Storage) -> None:
        """Flag the job; stages not started end cancelled now, the running one when it notices (an
        image job: its images not started are skipped, those running finish). The flag is kept in
        storage too (:data:`PIPELINE_CANCELLED`): a job rebuilt from storage stays cancelled."""
        storage.put(self.kind.folder(job_id, PIPELINE_CANCELLED), json.dumps({"cancelled_at": time.time()}).encode(),
                    "application/json")
        self._cancelled(job_id, json.loads(self._call(lambda: self.r.hget(self.key(job_id), "stages")) or "[]"),
                        storage)

    def _cancelled(self, job_id: str, stages: list[str], storage: Storage) -> None:
        if not self.kind.per_image:
            self._set(job_id, cancelled="1")
            self._end_stages(job_id, ("pending",), "cancelled")
            return
        for stage in stages:  # an image job's one stage
            if self.settle(job_id, stage, cancel=True):  # nothing was running: the cancel accounted for every image
                self._complete(job_id, stage, storage)
                self._ended(job_id)

    def cancelled(self, job_id: str) -> bool:
        return self._call(lambda: self.r.hget(self.key(job_id), "cancelled")) == "1"

    def _end_stages(self, job_id: str, states: tuple[str, ...], state: str, error: str | None = None) -> None:
        for stage in json.loads(self._call(lambda: self.r.hget(self.key(job_id), "stages")) or "[]"):
            if self.stage_state(job_id, stage) in states:
                self.finish(job_id, stage, state, error=error)

    def stop_all(self, job_id: str) -> None:
        """A task of a cancelled job ends it: every stage not finished ends cancelled."""
        self._end_stages(job_id, ("pending", "running"), "cancelled")

    def fail_open(self, job_id: str, reason: str) -> None:
        """A job whose record in storage cannot be read any more: every stage not finished fails with
        the reason, and the job leaves the reaper's scan (nothing of it can run)."""
        self._end_stages(job_id, ("pending", "running"), "failed", reason)
        self._call(lambda: self.r.srem(self.kind.active_key, job_id))

    def map_failures(self, job_id: str) -> dict[str, str]:
        """Images without a map, and why."""
        return self._call(lambda: self.r.hgetall(self.key(job_id, "map_failures")))

    # ---------------------------------------------------------------- what runs next: one decision
    def advance(self, job_id: str, spec: JobPlan, dead_after_s: float, limit: int | None = None) -> list[Send]:
        """The messages to send now for the job, each recorded as sent (``mark_queued.lua``, in one
        call): the first unfinished stage (every chunk of it, for a chunked stage) that was never
        sent, whose delivery died (started, lease gone), or whose message is older than
        ``dead_after_s`` (lost with Redis); at most ``limit`` (the API's bound: the rest go with the next task's or the
        reaper's call). A job that is terminal leaves the reaper's scan and gets nothing. (A
        cancelled image job runs on until its chunks are counted: its images running finish.)"""
        raw = self._call(lambda: self.r.hgetall(self.key(job_id)))
        if not raw:
            return []
        states = {s: raw.get(f"{s}.state", "pending") for s in spec.stages()}
        current = next((s for s in spec.stages() if states[s] not in ("done", "skipped")), None)
        stopped = raw.get("cancelled") == "1" and not self.kind.per_image
        if stopped or "failed" in states.values() or current is None:
            if stopped:
                self.stop_all(job_id)
            self._ended(job_id)
            return []
        sends = [Send(current, n) for n in range(len(spec.chunks))] if STAGE[current].chunked else [Send(current)]
        keys = [self.key(job_id, "units"), *[self.key(job_id, f"lease:{send.unit}") for send in sends]]
        args = [time.time(), dead_after_s, limit or 0, *[send.unit for send in sends]]
        return [sends[n] for n in self._call(lambda: self._mark_queued(keys=keys, args=args))]

    def _ended(self, job_id: str) -> None:
        """The job is terminal: it leaves the reaper's scan, and its callback (if any) is queued, once."""
        self._call(lambda: self.r.srem(self.kind.active_key, job_id))
        callback_url, owner = self._call(lambda: self.r.hmget(self.key(job_id), ["callback_url", "owner"]))
        notify_finished(self.r, self.kind.name, job_id, self.status(job_id), callback_url, owner or "", self.ttl_s)

    def active(self) -> Iterator[str]:
        """Jobs the reaper looks after (not yet terminal); jobs Redis no longer has leave the set."""
        for job_id in self._call(lambda: self.r.smembers(self.kind.active_key)):
            if self.exists(job_id):
                yield job_id
            else:
                self._call(lambda j=job_id: self.r.srem(self.kind.active_key, j))

    # ---------------------------------------------------------------- reading
    def request(self, job_id: str) -> dict[str, Any]:
        """What the job's status shows of its request (:attr:`JobKind.shown`)."""
        return json.loads(self._call(lambda: self.r.hget(self.key(job_id), "request")) or "{}")

    def status(self, job_id: str, max_errors: int = 50) -> dict[str, Any]:
        """The job's status: an image job's from its images (``max_errors``: how many errors it
        lists), a pipeline's or training job's from its stages."""
        if self.kind.per_image:
            return self.image_status(job_id, max_errors)
        raw = self._call(lambda: self.r.hgetall(self.key(job_id)))
        return staged_body(job_id, raw, self.map_failures(job_id), chunked_stage(json.loads(raw["stages"])))
