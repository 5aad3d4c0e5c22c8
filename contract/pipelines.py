"""Pipeline jobs: a whole data set through the paper's chain, shared by the API and the workers.

A pipeline job is one Celery canvas (:func:`contract.tasks.TaskQueue.send_pipeline`): the
classifier stage on the training queue, then a chord of RIB-map chunks on the image queue whose
callback is the refinement stage (confident labels, IRN, random walk) on the training queue, then
optionally DeepLab. What the job was asked is :class:`PipelineSpec`, kept in storage
(``jobs/<id>/pipeline/pipeline.json``); a task carries only the job id and its stage.

Its state in Redis (:class:`PipelineStore`, one hash per job) is each stage's state, progress and
report. Delivery is at-least-once, so each stage and chunk is guarded:

- a *lease* (a Redis key with a time to live, renewed by a heartbeat) lets one copy of a stage run
  at a time; a copy delivered again while another runs is ignored (no result, no next stage);
- a stage that finished and handed the chain on is *handed off*; a copy delivered after that is
  ignored too, while one delivered after a finish that did not hand on (its worker died in
  between) hands on;
- cancelling flags the job (in Redis, and in storage so that a rebuilt job stays cancelled): the
  stage running stops at its next epoch, chunk or logged DeepLab step, and every stage after it
  ends ``cancelled`` without running.

A job Redis lost (a restart without its append-only file) is rebuilt from storage on its next
``GET`` (:meth:`PipelineStore.restore`) and its canvas queued again: it goes on from the last
stage whose report is stored. Every job ends in a terminal state: ``done``, ``failed`` (a stage
failed: its error is shown) or ``cancelled``.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field

from contract.jobs import JOB_ID
from rib_core.artifacts import PIPELINE_CANCELLED, PIPELINE_SPEC, pipeline_key, stage_marker
from rib_core.rib_config import RibConfig
from rib_core.stage_configs import ClassifierTrainConfig, DeepLabTrainConfig, RefineConfig
from rib_core.storage import Storage

PIPELINE_STAGE = "rib.pipeline_stage"  # a training stage (training queue)
PIPELINE_MAPS = "rib.pipeline_maps"    # a chunk of RIB maps (image queue)

Stage = Literal["classifier", "maps", "refine", "deeplab"]
STAGES: tuple[Stage, ...] = ("classifier", "maps", "refine", "deeplab")
FINISHED = ("done", "skipped", "failed", "cancelled")


class PipelineSpec(BaseModel):
    """What a pipeline job runs: its data set, an optional classifier to start from, and each stage's
    settings (the objects ``rib demo`` / ``rib refine`` / ``rib deeplab`` read)."""

    model_config = ConfigDict(extra="forbid")

    manifest: str = Field(description="s3:// URI of the data set's manifest (images, labels, optional masks)")
    classifier_uri: str | None = Field(None, description="a trained classifier: the classifier stage is skipped")
    val_manifest: str | None = Field(None, description="labelled manifest the classifier is scored on every "
                                                       "epoch; default: the data set itself")
    classifier: ClassifierTrainConfig = Field(default_factory=ClassifierTrainConfig)
    rib: RibConfig = Field(default_factory=RibConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)
    deeplab: DeepLabTrainConfig | None = Field(None, description="set: train DeepLab on the pseudo-masks, then "
                                                                 "evaluate and predict with it")
    image_ids: list[str] = Field(description="the manifest's image ids, in order")
    chunks: list[list[str]] = Field(description="the image ids of each RIB-map chunk")
    owner: str = Field("", description="digest of the API key that made the job (contract.jobs.owner_of)")

    def stages(self) -> list[Stage]:
        return [s for s in STAGES if s != "deeplab" or self.deeplab is not None]


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


class PipelineStore:
    """The Redis record of every pipeline job: ``rib:pipeline:<id>`` (a hash: owner, stages, cancel
    flag, per stage ``<stage>.state|started|finished|error|progress|report``), its leases
    (``...:lease:<name>``) and hand-offs (``...:handed``, a set)."""

    def __init__(self, client: redis.Redis, ttl_s: int = 7 * 24 * 3600) -> None:
        self.r = client
        self.ttl_s = ttl_s

    @staticmethod
    def key(job_id: str, part: str = "") -> str:
        return f"rib:pipeline:{job_id}" + (f":{part}" if part else "")

    def _set(self, job_id: str, **fields: Any) -> None:
        with self.r.pipeline() as pipe:
            pipe.hset(self.key(job_id), mapping={k: v if isinstance(v, str) else json.dumps(v)
                                                 for k, v in fields.items()})
            pipe.expire(self.key(job_id), self.ttl_s)
            pipe.execute()

    # ---------------------------------------------------------------- lifecycle
    def create(self, job_id: str, spec: PipelineSpec, owner: str) -> None:
        fields: dict[str, Any] = {"owner": owner, "created_at": time.time(), "stages": spec.stages(),
                                  "total": len(spec.image_ids), "chunks": len(spec.chunks)}
        for stage in spec.stages():
            fields[f"{stage}.state"] = "skipped" if stage == "classifier" and spec.classifier_uri else "pending"
        self._set(job_id, **fields)

    def restore(self, job_id: str, storage: Storage) -> PipelineSpec | None:
        """Rebuild a job Redis no longer has from its ``pipeline.json``: stages whose report is in
        storage are done, and a job cancelled before stays cancelled. Returns its spec, for the
        caller to queue the canvas again (finished stages are then skipped, maps in storage kept);
        None when storage has no such job, another process is rebuilding it, or it was cancelled."""
        if not JOB_ID.fullmatch(job_id) or not storage.exists(pipeline_key(job_id, PIPELINE_SPEC)):
            return None
        if not self.r.set(self.key(job_id, "restoring"), 1, nx=True, ex=60) or self.exists(job_id):
            return None
        spec = PipelineSpec.model_validate_json(storage.get(pipeline_key(job_id, PIPELINE_SPEC)))
        self.create(job_id, spec, spec.owner)
        for stage in spec.stages():
            if storage.exists(marker := pipeline_key(job_id, stage_marker(stage))):
                self.finish(job_id, stage, "done", json.loads(storage.get(marker)))
        if storage.exists(pipeline_key(job_id, PIPELINE_CANCELLED)):
            self._set(job_id, cancelled="1")
            self.stop_all(job_id)
            return None
        return spec

    def exists(self, job_id: str, owner: str | None = None) -> bool:
        if not JOB_ID.fullmatch(job_id):
            return False
        if owner is None:
            return bool(self.r.exists(self.key(job_id)))
        found = self.r.hget(self.key(job_id), "owner")
        return found is not None and bool(owner) and hmac.compare_digest(found, owner)

    def stage_state(self, job_id: str, stage: str) -> str:
        return self.r.hget(self.key(job_id), f"{stage}.state") or "pending"

    def start(self, job_id: str, stage: str) -> None:
        if self.stage_state(job_id, stage) in ("pending", "running"):
            self.r.hsetnx(self.key(job_id), f"{stage}.started", time.time())
            self._set(job_id, **{f"{stage}.state": "running"})

    def progress(self, job_id: str, stage: str, **values: Any) -> None:
        self._set(job_id, **{f"{stage}.progress": values})

    def finish(self, job_id: str, stage: str, state: str, report: dict[str, Any] | None = None,
               error: str | None = None) -> None:
        fields: dict[str, Any] = {f"{stage}.state": state, f"{stage}.finished": time.time()}
        if report is not None:
            fields[f"{stage}.report"] = report
        if error is not None:
            fields[f"{stage}.error"] = error
        self._set(job_id, **fields)

    def chunk_done(self, job_id: str, chunk: int, failures: dict[str, str]) -> int:
        """Count a finished chunk of maps (once, however often it runs); returns how many are done."""
        with self.r.pipeline() as pipe:
            pipe.sadd(self.key(job_id, "chunks"), chunk)
            if failures:
                pipe.hset(self.key(job_id, "map_failures"), mapping=failures)
            pipe.scard(self.key(job_id, "chunks"))
            for part in ("chunks", "map_failures"):
                pipe.expire(self.key(job_id, part), self.ttl_s)
            return int(pipe.execute()[-3])

    def cancel(self, job_id: str, storage: Storage) -> None:
        """Flag the job; stages not started end cancelled now, the running one when it notices. The
        flag is kept in storage too (:data:`PIPELINE_CANCELLED`): a job rebuilt from storage stays
        cancelled."""
        storage.put(pipeline_key(job_id, PIPELINE_CANCELLED), json.dumps({"cancelled_at": time.time()}).encode(),
                    "application/json")
        self._set(job_id, cancelled="1")
        self.cancel_pending(job_id)

    def cancelled(self, job_id: str) -> bool:
        return self.r.hget(self.key(job_id), "cancelled") == "1"

    def cancel_pending(self, job_id: str, states: tuple[str, ...] = ("pending",)) -> None:
        for stage in json.loads(self.r.hget(self.key(job_id), "stages") or "[]"):
            if self.stage_state(job_id, stage) in states:
                self.finish(job_id, stage, "cancelled")

    def stop_all(self, job_id: str) -> None:
        """A task of a cancelled job stops the chain: every stage not finished ends cancelled."""
        self.cancel_pending(job_id, ("pending", "running"))

    def maps_ready(self, job_id: str) -> bool | None:
        """Whether the refinement stage may start: True once every chunk of maps is counted (the
        maps stage is done), None if it never will (the maps stage failed or was cancelled), else
        False. Celery's chord may call the refinement stage early when a chunk is delivered again
        after its count (its worker died before the hand-off): that stage waits for this."""
        state = self.stage_state(job_id, "maps")
        return True if state == "done" else None if state in ("failed", "cancelled") else False

    def map_failures(self, job_id: str) -> dict[str, str]:
        """Images without a map, and why."""
        return self.r.hgetall(self.key(job_id, "map_failures"))

    # ---------------------------------------------------------------- at-least-once delivery
    def claim(self, job_id: str, name: str, token: str, lease_s: float) -> bool:
        """Hold the lease of ``name`` (a stage, or a chunk) for ``token``; False while another holds it."""
        key = self.key(job_id, f"lease:{name}")
        return bool(self.r.set(key, token, nx=True, px=int(lease_s * 1000))) or self.r.get(key) == token

    def renew(self, job_id: str, name: str, token: str, lease_s: float) -> None:
        key = self.key(job_id, f"lease:{name}")
        if self.r.get(key) == token:
            self.r.pexpire(key, int(lease_s * 1000))

    def release(self, job_id: str, name: str, token: str) -> None:
        key = self.key(job_id, f"lease:{name}")
        if self.r.get(key) == token:
            self.r.delete(key)

    def hand_off(self, job_id: str, name: str) -> None:
        """``name`` finished and Celery sent what follows it."""
        self.r.sadd(self.key(job_id, "handed"), name)
        self.r.expire(self.key(job_id, "handed"), self.ttl_s)

    def handed_off(self, job_id: str, name: str) -> bool:
        return bool(self.r.sismember(self.key(job_id, "handed"), name))

    # ---------------------------------------------------------------- reading
    def status(self, job_id: str) -> dict[str, Any]:
        raw = self.r.hgetall(self.key(job_id))
        chunks_done = self.r.scard(self.key(job_id, "chunks"))
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
        stages["maps"]["progress"] = {"chunks_done": chunks_done, "chunks": int(raw["chunks"]),
                                      "images_failed": len(failures)}
        if failures:
            stages["maps"]["error"] = stages["maps"]["error"] or "; ".join(
                f"{k}: {v}" for k, v in sorted(failures.items())[:10])
        cancelled = raw.get("cancelled") == "1"
        return {"job_id": job_id, "state": pipeline_state(stages, cancelled), "total": int(raw["total"]),
                "created_at": float(raw["created_at"]), "cancelled": cancelled, "stages": stages}
