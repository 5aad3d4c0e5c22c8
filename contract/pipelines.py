"""Staged jobs, shared by the API and the workers: pipeline jobs (a whole data set through the
paper's chain) and offline training jobs (a job of one stage), one state machine for both.

A pipeline job is a list of stages (:data:`contract.stages.STAGES`, the one registry: classifier,
maps, refine, optionally DeepLab) run one after the other; the maps stage runs as chunks of images
on the image queue, the others as one task each on the training queue; a training job's one stage,
``training``, runs on the training queue. There is no Celery canvas: every
decision of what runs next is :meth:`PipelineStore.advance`'s, made from the job's state, and a
unit (a stage or a chunk) is done exactly once in Redis (the maps stage by the chunk whose count
completes it: ``chunk_done.lua``, the single completion decision).

What the job was asked is its spec (:class:`PipelineSpec` in ``jobs/<id>/pipeline/pipeline.json``,
:class:`contract.training.TrainingSpec` in ``jobs/<id>/training/training.json``), signed by the
service, with its inputs frozen beside it (the validated records, every location absolute); a task
carries only the job id and its unit. Delivery is at-least-once:

- a *lease* (a Redis key with a time to live, renewed by a heartbeat) lets one copy of a unit run;
  a copy delivered while another holds it is dropped;
- every delivery that starts counts an *attempt*; past ``RIB_MAX_STAGE_ATTEMPTS`` (deliveries whose
  worker died: killed, out of memory) the unit fails with that reason, and the message is dropped;
- a unit whose worker died (running, lease gone) or whose message was lost is sent again by the
  *reaper* (:meth:`PipelineStore.due`, in every worker), which also advances jobs whose finishing
  task died between its result and the next stage;
- every write a worker makes waits out a Redis outage, and none recreates a job Redis lost: a job
  lost (a wipe, a restart without its append-only file) is rebuilt from storage (:meth:`restore`:
  stages from their reports, chunks from their markers) by the next task or ``GET`` that meets it.

Every job ends ``done``, ``failed`` (a stage failed: its error is shown) or ``cancelled``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import redis

from contract.job_kinds import PIPELINE, JobKind, JobPlan
from contract.lua import script
from contract.records import Records, UntrustedRecordError
from contract.stages import FINISHED, PipelineSpec, Send
from contract.stores import JOB_ID, RedisJobs
from contract.webhooks import notify_finished
from rib_core.io.artifacts import PIPELINE_CANCELLED, chunk_marker, stage_marker


def pipeline_state(stages: dict[str, dict[str, Any]], cancelled: bool) -> str:
    """The job's state from its stages': failed or cancelled once any stage is, done once all are
    done (or skipped), cancelling while a cancelled job still runs a stage."""
    states = [s["state"] for s in stages.values()]
    if "failed" in states:
        return "failed"
    if cancelled:
        return "cancelling" if "running" in states else "cancelled"
    if all(s in ("done", "skipped") for s in states):
        return "done"
    return "running" if any(s != "pending" for s in states) else "queued"


class PipelineStore(RedisJobs):
    """The Redis record of every staged job of one ``kind`` (pipeline jobs, or training jobs: a job of
    one stage): ``rib:<kind>:<id>`` (a hash: owner, stages, cancel flag, per stage
    ``<stage>.state|started|finished|error|progress|report``), per unit its attempts, start and send
    times (``...:units``), the images without a map (``...:map_failures``) and the leases
    (``...:lease:<unit>``). ``patience_s``: how long a call waits out a Redis outage (the workers
    wait; the API answers 503 at once)."""

    def __init__(self, client: redis.Redis, ttl_s: int = 7 * 24 * 3600, patience_s: float = 0.0,
                 kind: JobKind = PIPELINE) -> None:
        super().__init__(client, f"rib:{kind.name}", ttl_s, patience_s)
        self.kind = kind
        self._update = client.register_script(script("update"))
        self._start = client.register_script(script("start"))
        self._chunk_done = client.register_script(script("chunk_done"))
        self._mark_queued = client.register_script(script("mark_queued"))

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
        for stage in spec.stages():
            fields[f"{stage}.state"] = "skipped" if stage in spec.skipped() else "pending"
        mapping = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}

        def write() -> None:
            with self.r.pipeline() as pipe:
                pipe.hset(self.key(job_id), mapping=mapping)
                pipe.expire(self.key(job_id), self.ttl_s)
                pipe.sadd(self.kind.active_key, job_id)
                pipe.execute()

        self._call(write)

    def read_spec(self, job_id: str, records: Records) -> JobPlan:
        """The job's spec, from its signed record in storage: FileNotFoundError without one,
        UntrustedRecordError when the service did not write it."""
        return self.kind.parse(records.get(self.kind.folder(job_id, self.kind.record)))

    def restore(self, job_id: str, records: Records) -> JobPlan | None:
        """Rebuild a job Redis no longer has from storage: its signed record (``pipeline.json``; a record the
        service did not write is never adopted), stages whose report is stored done, chunks whose
        marker is stored counted, a job cancelled before cancelled. Returns its spec (the caller
        then :meth:`advance`-s it), or None when storage has no such job, or another process is
        rebuilding it."""
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
        for stage in spec.stages():
            if storage.exists(marker := self.kind.folder(job_id, stage_marker(stage))):
                self.finish(job_id, stage, "done", json.loads(storage.get(marker)))
        if self.stage_state(job_id, "maps") not in FINISHED:
            for n in range(len(spec.chunks)):
                if storage.exists(marker := self.kind.folder(job_id, chunk_marker(n))):
                    failures = json.loads(storage.get(marker))["failures"]
                    if self.chunk_done(job_id, n, failures, len(spec.chunks)) == 1:
                        self.maps_complete(job_id, spec, storage)
        if storage.exists(self.kind.folder(job_id, PIPELINE_CANCELLED)):
            self._set(job_id, cancelled="1")
            self.stop_all(job_id)
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

    def chunk_done(self, job_id: str, chunk: int, failures: dict[str, str], chunks: int) -> int:
        """Count a finished chunk of maps once: 1 when it completed the maps stage (now done), 0
        otherwise, -1 when Redis lost the job."""
        args: list[Any] = [chunk, chunks, time.time(), self.ttl_s]
        for image_id, error in failures.items():
            args += [image_id, error[:500]]
        keys = [self.key(job_id), self.key(job_id, "units"), self.key(job_id, "map_failures")]
        return int(self._call(lambda: self._chunk_done(keys=keys, args=args)))

    def maps_complete(self, job_id: str, spec: PipelineSpec, storage: Any) -> None:
        """The maps stage is done (its last chunk counted): keep its report, the stage's marker."""
        report = {"images": len(spec.image_ids), "maps": len(spec.image_ids) - len(self.map_failures(job_id))}
        storage.put(self.kind.folder(job_id, stage_marker("maps")), json.dumps(report).encode(), "application/json")
        self.finish(job_id, "maps", "done", report)

    def cancel(self, job_id: str, storage: Any) -> None:
        """Flag the job; stages not started end cancelled now, the running one when it notices. The
        flag is kept in storage too (:data:`PIPELINE_CANCELLED`): a job rebuilt from storage stays
        cancelled."""
        storage.put(self.kind.folder(job_id, PIPELINE_CANCELLED), json.dumps({"cancelled_at": time.time()}).encode(),
                    "application/json")
        self._set(job_id, cancelled="1")
        self._end_stages(job_id, ("pending",), "cancelled")

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
        """The messages to send now for the job, each recorded as sent (``mark_queued.lua``): the
        first unfinished stage (every chunk of it, for maps) that was never sent, whose delivery died
        (started, lease gone), or whose message is older than ``dead_after_s`` (lost with Redis); at
        most ``limit`` (the API's bound: the rest go with the next task's or the reaper's call). A
        job that is terminal leaves the reaper's scan and gets nothing."""
        raw = self._call(lambda: self.r.hgetall(self.key(job_id)))
        if not raw:
            return []
        states = {s: raw.get(f"{s}.state", "pending") for s in spec.stages()}
        current = next((s for s in spec.stages() if states[s] not in ("done", "skipped")), None)
        if raw.get("cancelled") == "1" or "failed" in states.values() or current is None:
            if raw.get("cancelled") == "1":
                self.stop_all(job_id)
            self._ended(job_id, spec)
            return []
        sends = [Send(current, n) for n in range(len(spec.chunks))] if current == "maps" else [Send(current)]
        due: list[Send] = []
        for send in sends:
            if limit is not None and len(due) >= limit:
                break
            if self._due(job_id, send, dead_after_s):
                due.append(send)
        return due

    def _ended(self, job_id: str, spec: JobPlan) -> None:
        """The job is terminal: it leaves the reaper's scan, and its callback (if any) is queued, once."""
        self._call(lambda: self.r.srem(self.kind.active_key, job_id))
        notify_finished(self.r, self.kind.name, job_id, self.status(job_id), spec.callback_url, spec.owner, self.ttl_s)

    def _due(self, job_id: str, send: Send, dead_after_s: float) -> bool:
        if self._call(lambda: self.r.exists(self.key(job_id, f"lease:{send.unit}"))):
            return False  # a live delivery runs it
        return bool(self._call(lambda: self._mark_queued(keys=[self.key(job_id, "units")],
                                                         args=[send.unit, time.time(), dead_after_s])))

    def active(self) -> Iterator[str]:
        """Jobs the reaper looks after (not yet terminal); jobs Redis no longer has leave the set."""
        for job_id in self._call(lambda: self.r.smembers(self.kind.active_key)):
            if self.exists(job_id):
                yield job_id
            else:
                self._call(lambda j=job_id: self.r.srem(self.kind.active_key, j))

    # ---------------------------------------------------------------- leases
    def claim(self, job_id: str, unit: str, token: str, lease_s: float) -> bool:
        """Hold the lease of ``unit`` (a stage, or a chunk) for ``token``; False while another holds it."""
        key = self.key(job_id, f"lease:{unit}")
        return bool(self._call(lambda: self.r.set(key, token, nx=True, px=int(lease_s * 1000)))) or \
            self._call(lambda: self.r.get(key)) == token

    def renew(self, job_id: str, unit: str, token: str, lease_s: float) -> None:
        key = self.key(job_id, f"lease:{unit}")
        if self.r.get(key) == token:
            self.r.pexpire(key, int(lease_s * 1000))

    def release(self, job_id: str, unit: str, token: str) -> None:
        key = self.key(job_id, f"lease:{unit}")
        if self._call(lambda: self.r.get(key)) == token:
            self._call(lambda: self.r.delete(key))

    # ---------------------------------------------------------------- reading
    def request(self, job_id: str) -> dict[str, Any]:
        """What the job's status shows of its request (:attr:`JobKind.shown`)."""
        return json.loads(self._call(lambda: self.r.hget(self.key(job_id), "request")) or "{}")

    def status(self, job_id: str) -> dict[str, Any]:
        raw = self._call(lambda: self.r.hgetall(self.key(job_id)))
        failures = self.map_failures(job_id)
        now = time.time()
        stages: dict[str, dict[str, Any]] = {}
        for stage in json.loads(raw["stages"]):
            started, finished = raw.get(f"{stage}.started"), raw.get(f"{stage}.finished")
            stages[stage] = {
                "state": raw.get(f"{stage}.state", "pending"),
                "started_at": float(started) if started else None,
                "finished_at": float(finished) if finished else None,
                "seconds": round((float(finished) if finished else now) - float(started), 1) if started else None,
                "progress": json.loads(raw[f"{stage}.progress"]) if f"{stage}.progress" in raw else None,
                "report": json.loads(raw[f"{stage}.report"]) if f"{stage}.report" in raw else None,
                "error": raw.get(f"{stage}.error"),
            }
        if "maps" in stages:
            stages["maps"]["progress"] = {"chunks_done": int(raw.get("chunks_done", 0)),
                                          "chunks": int(raw["chunks"]), "images_failed": len(failures)}
        if failures:
            stages["maps"]["error"] = stages["maps"]["error"] or "; ".join(
                f"{k}: {v}" for k, v in sorted(failures.items())[:10])
        cancelled = raw.get("cancelled") == "1"
        return {"job_id": job_id, "state": pipeline_state(stages, cancelled), "total": int(raw["total"]),
                "created_at": float(raw["created_at"]), "cancelled": cancelled, "stages": stages}
