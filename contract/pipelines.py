"""Pipeline jobs: a whole data set through the paper's chain, shared by the API and the workers.

A pipeline job is a list of stages (:data:`STAGES`, the one registry: classifier, maps, refine,
optionally DeepLab) run one after the other; the maps stage runs as chunks of images on the image
queue, the others as one task each on the training queue. There is no Celery canvas: every
decision of what runs next is :meth:`PipelineStore.advance`'s, made from the job's state, and a
unit (a stage or a chunk) is done exactly once in Redis (the maps stage by the chunk whose count
completes it: ``chunk_done.lua``, the single completion decision).

What the job was asked is :class:`PipelineSpec`, kept in storage (``jobs/<id>/pipeline/pipeline.json``,
signed by the service) with its inputs frozen beside it (``manifest.jsonl``: the validated records,
every location absolute); a task carries only the job id and its unit. Delivery is at-least-once:

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

import hmac
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import redis
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from contract.jobs import JOB_ID
from contract.lua import script
from contract.records import Records, UntrustedRecordError
from contract.webhooks import notify_finished
from rib_core.config.rib_config import RibConfig
from rib_core.config.stage_configs import ClassifierTrainConfig, DeepLabTrainConfig, RefineConfig
from rib_core.io.artifacts import PIPELINE_CANCELLED, PIPELINE_SPEC, chunk_marker, pipeline_key, stage_marker

PIPELINE_STAGE = "rib.pipeline_stage"  # a training stage (training queue)
PIPELINE_MAPS = "rib.pipeline_maps"    # a chunk of RIB maps (image queue)
ACTIVE_KEY = "rib:pipelines:active"    # jobs not yet terminal: what the reaper scans

Stage = Literal["classifier", "maps", "refine", "deeplab"]
FINISHED = ("done", "skipped", "failed", "cancelled")
OUTAGES = (RedisConnectionError, RedisTimeoutError, BusyLoadingError)
T = TypeVar("T")


@dataclass(frozen=True)
class StageDef:
    """One stage of the chain: its task and queue, the work-folder directories it writes, and whether
    a job may leave it out."""

    name: Stage
    task: str
    queue: Literal["training", "images"]
    folders: tuple[str, ...]
    optional: bool = False


# The registry: every stage once, in order. The worker's runners, the spec's stage list, the
# API's answers and the demo (rib_core.jobs.stages's functions, same folders) follow it.
STAGES: tuple[StageDef, ...] = (
    StageDef("classifier", PIPELINE_STAGE, "training", ("classifier",)),
    StageDef("maps", PIPELINE_MAPS, "images", ("maps",)),
    StageDef("refine", PIPELINE_STAGE, "training", ("refined",)),
    StageDef("deeplab", PIPELINE_STAGE, "training", ("deeplab",), optional=True),
)
STAGE = {s.name: s for s in STAGES}


class PipelineSpec(BaseModel):
    """What a pipeline job runs: its frozen data set, an optional classifier to start from, and each
    stage's settings (the objects ``rib demo`` / ``rib refine`` / ``rib deeplab`` read)."""

    model_config = ConfigDict(extra="forbid")

    manifest: str = Field(description="the job's frozen copy of the data set's manifest (in its own prefix)")
    source_manifest: str = Field("", description="the manifest the user gave, as it was at submit")
    manifest_sha256: str = Field("", description="digest of the frozen manifest, checked on every read")
    classifier_uri: str | None = Field(None, description="a trained classifier: the classifier stage is skipped")
    val_manifest: str | None = Field(None, description="frozen labelled manifest the classifier is scored on "
                                                       "every epoch; default: the data set itself")
    classifier: ClassifierTrainConfig = Field(default_factory=ClassifierTrainConfig)
    rib: RibConfig = Field(default_factory=RibConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)
    deeplab: DeepLabTrainConfig | None = Field(None, description="set: train DeepLab on the pseudo-masks, then "
                                                                 "evaluate and predict with it")
    image_ids: list[str] = Field(description="the manifest's image ids, in order")
    chunks: list[list[str]] = Field(description="the image ids of each RIB-map chunk")
    owner: str = Field("", description="digest of the API key that made the job (contract.jobs.owner_of)")
    callback_url: str | None = Field(None, description="POSTed the job's final state (webhooks)")

    def stages(self) -> list[Stage]:
        return [s.name for s in STAGES if not s.optional or self.deeplab is not None]

    def skipped(self) -> list[Stage]:
        """Stages the job has but does not run: the classifier when one is given."""
        return ["classifier"] if self.classifier_uri else []


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


@dataclass(frozen=True)
class Send:
    """A message :meth:`PipelineStore.advance` decided to send: a stage, or chunk ``chunk`` of maps."""

    stage: Stage
    chunk: int | None = None

    @property
    def unit(self) -> str:
        return self.stage if self.chunk is None else f"maps-{self.chunk}"


class PipelineStore:
    """The Redis record of every pipeline job: ``rib:pipeline:<id>`` (a hash: owner, stages, cancel
    flag, per stage ``<stage>.state|started|finished|error|progress|report``), per unit its attempts,
    start and send times (``...:units``), the images without a map (``...:map_failures``) and the
    leases (``...:lease:<unit>``). ``patience_s``: how long a call waits out a Redis outage (the
    workers wait; the API answers 503 at once)."""

    def __init__(self, client: redis.Redis, ttl_s: int = 7 * 24 * 3600, patience_s: float = 0.0) -> None:
        self.r = client
        self.ttl_s = ttl_s
        self.patience_s = patience_s
        self._update = client.register_script(script("update"))
        self._start = client.register_script(script("start"))
        self._chunk_done = client.register_script(script("chunk_done"))
        self._mark_queued = client.register_script(script("mark_queued"))

    @staticmethod
    def key(job_id: str, part: str = "") -> str:
        return f"rib:pipeline:{job_id}" + (f":{part}" if part else "")

    def _call(self, fn: Callable[[], T]) -> T:
        """``fn()``, retried through a Redis outage for up to ``patience_s``."""
        deadline, pause = time.monotonic() + self.patience_s, 0.5
        while True:
            try:
                return fn()
            except OUTAGES:
                if time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)
                pause = min(2 * pause, 15.0)

    def _set(self, job_id: str, **fields: Any) -> bool:
        """Write fields of a job Redis has; False (nothing written) when it has not."""
        args: list[Any] = [self.ttl_s]
        for k, v in fields.items():
            args += [k, v if isinstance(v, str) else json.dumps(v)]
        return bool(self._call(lambda: self._update(keys=[self.key(job_id)], args=args)))

    # ---------------------------------------------------------------- lifecycle
    def create(self, job_id: str, spec: PipelineSpec) -> None:
        fields: dict[str, Any] = {"owner": spec.owner, "created_at": time.time(), "stages": spec.stages(),
                                  "total": len(spec.image_ids), "chunks": len(spec.chunks), "chunks_done": 0}
        for stage in spec.stages():
            fields[f"{stage}.state"] = "skipped" if stage in spec.skipped() else "pending"
        mapping = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}

        def write() -> None:
            with self.r.pipeline() as pipe:
                pipe.hset(self.key(job_id), mapping=mapping)
                pipe.expire(self.key(job_id), self.ttl_s)
                pipe.sadd(ACTIVE_KEY, job_id)
                pipe.execute()

        self._call(write)

    def restore(self, job_id: str, records: Records) -> PipelineSpec | None:
        """Rebuild a job Redis no longer has from storage: its signed ``pipeline.json`` (a record the
        service did not write is never adopted), stages whose report is stored done, chunks whose
        marker is stored counted, a job cancelled before cancelled. Returns its spec (the caller
        then :meth:`advance`-s it), or None when storage has no such job, or another process is
        rebuilding it."""
        if not JOB_ID.fullmatch(job_id):
            return None
        try:
            spec = PipelineSpec.model_validate(records.get(pipeline_key(job_id, PIPELINE_SPEC)))
        except (FileNotFoundError, UntrustedRecordError):
            return None
        if not self._call(lambda: self.r.set(self.key(job_id, "restoring"), 1, nx=True, ex=60)):
            return None
        if self.exists(job_id):
            return spec
        self.create(job_id, spec)
        storage = records.storage
        for stage in spec.stages():
            if storage.exists(marker := pipeline_key(job_id, stage_marker(stage))):
                self.finish(job_id, stage, "done", json.loads(storage.get(marker)))
        if self.stage_state(job_id, "maps") not in FINISHED:
            for n in range(len(spec.chunks)):
                if storage.exists(marker := pipeline_key(job_id, chunk_marker(n))):
                    failures = json.loads(storage.get(marker))["failures"]
                    if self.chunk_done(job_id, n, failures, len(spec.chunks)) == 1:
                        self.maps_complete(job_id, spec, storage)
        if storage.exists(pipeline_key(job_id, PIPELINE_CANCELLED)):
            self._set(job_id, cancelled="1")
            self.stop_all(job_id)
        return spec

    def exists(self, job_id: str, owner: str | None = None) -> bool:
        """Whether the job is known (and, given an ``owner``, belongs to it: a job without one belongs to nobody)."""
        if not JOB_ID.fullmatch(job_id):
            return False
        if owner is None:
            return bool(self._call(lambda: self.r.exists(self.key(job_id))))
        found = self._call(lambda: self.r.hget(self.key(job_id), "owner"))
        return found is not None and bool(owner) and hmac.compare_digest(found, owner)

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
        storage.put(pipeline_key(job_id, stage_marker("maps")), json.dumps(report).encode(), "application/json")
        self.finish(job_id, "maps", "done", report)

    def cancel(self, job_id: str, storage: Any) -> None:
        """Flag the job; stages not started end cancelled now, the running one when it notices. The
        flag is kept in storage too (:data:`PIPELINE_CANCELLED`): a job rebuilt from storage stays
        cancelled."""
        storage.put(pipeline_key(job_id, PIPELINE_CANCELLED), json.dumps({"cancelled_at": time.time()}).encode(),
                    "application/json")
        self._set(job_id, cancelled="1")
        self._cancel_stages(job_id, ("pending",))

    def cancelled(self, job_id: str) -> bool:
        return self._call(lambda: self.r.hget(self.key(job_id), "cancelled")) == "1"

    def _cancel_stages(self, job_id: str, states: tuple[str, ...]) -> None:
        for stage in json.loads(self._call(lambda: self.r.hget(self.key(job_id), "stages")) or "[]"):
            if self.stage_state(job_id, stage) in states:
                self.finish(job_id, stage, "cancelled")

    def stop_all(self, job_id: str) -> None:
        """A task of a cancelled job ends it: every stage not finished ends cancelled."""
        self._cancel_stages(job_id, ("pending", "running"))

    def map_failures(self, job_id: str) -> dict[str, str]:
        """Images without a map, and why."""
        return self._call(lambda: self.r.hgetall(self.key(job_id, "map_failures")))

    # ---------------------------------------------------------------- what runs next: one decision
    def advance(self, job_id: str, spec: PipelineSpec, dead_after_s: float, limit: int | None = None) -> list[Send]:
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

    def _ended(self, job_id: str, spec: PipelineSpec) -> None:
        """The job is terminal: it leaves the reaper's scan, and its callback (if any) is queued, once."""
        self._call(lambda: self.r.srem(ACTIVE_KEY, job_id))
        notify_finished(self.r, "pipeline", job_id, self.status(job_id), spec.callback_url, spec.owner, self.ttl_s)

    def _due(self, job_id: str, send: Send, dead_after_s: float) -> bool:
        if self._call(lambda: self.r.exists(self.key(job_id, f"lease:{send.unit}"))):
            return False  # a live delivery runs it
        return bool(self._call(lambda: self._mark_queued(keys=[self.key(job_id, "units")],
                                                         args=[send.unit, time.time(), dead_after_s])))

    def active(self) -> Iterator[str]:
        """Jobs the reaper looks after (not yet terminal); jobs Redis no longer has leave the set."""
        for job_id in self._call(lambda: self.r.smembers(ACTIVE_KEY)):
            if self.exists(job_id):
                yield job_id
            else:
                self._call(lambda j=job_id: self.r.srem(ACTIVE_KEY, j))

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
        stages["maps"]["progress"] = {"chunks_done": int(raw.get("chunks_done", 0)), "chunks": int(raw["chunks"]),
                                      "images_failed": len(failures)}
        if failures:
            stages["maps"]["error"] = stages["maps"]["error"] or "; ".join(
                f"{k}: {v}" for k, v in sorted(failures.items())[:10])
        cancelled = raw.get("cancelled") == "1"
        return {"job_id": job_id, "state": pipeline_state(stages, cancelled), "total": int(raw["total"]),
                "created_at": float(raw["created_at"]), "cancelled": cancelled, "stages": stages}
