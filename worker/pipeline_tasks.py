"""The tasks of a pipeline job: a training stage (training queue) and a chunk of RIB maps (image queue).

Both are thin: copy the stage's inputs from the job's prefix in storage into a fresh local folder
(the frozen manifest checked against its digest), call the stage's function in
:mod:`rib_core.jobs.stages`, store what it wrote (a stage's report, ``stages/<stage>.json``, last)
and record the unit's state in Redis; then ask :meth:`contract.pipelines.PipelineStore.advance`
what runs next and send it. Training states are copied to storage after every epoch, so a stage
delivered again after its worker died continues from its last epoch; a stage whose report is in
storage is not run again.

Nothing a stage raises takes its worker down or comes back: any exception, MemoryError included,
fails the stage (or the chunk's images) with the reason, and the message is acknowledged. A
delivery whose worker died is counted (:meth:`PipelineStore.start`): past
``RIB_MAX_STAGE_ATTEMPTS`` the unit fails with that reason instead of running again.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import redis
from celery import Task, signals

from contract.pipelines import PIPELINE_MAPS, PIPELINE_STAGE, STAGE, PipelineSpec, PipelineStore, Send
from contract.records import Records, UntrustedRecordError
from contract.settings import Settings, get_settings
from contract.tasks import TaskQueue
from rib_core.data.datasets import Manifest, parse_manifest
from rib_core.io.artifacts import (
    PIPELINE_INDEX,
    PIPELINE_MANIFEST,
    PIPELINE_SPEC,
    PIPELINE_VAL_MANIFEST,
    chunk_marker,
    pipeline_index,
    pipeline_key,
    stage_marker,
)
from rib_core.io.storage import Storage
from rib_core.jobs.pipeline import resolve_device
from worker.celery_app import app
from worker.tasks import Runtime, beating, every, runtime

log = logging.getLogger(__name__)
OUTAGE_WAIT_S = 600  # how long a task's Redis write waits out an outage (a restart) before giving up
SPECS_KEPT = 64      # pipeline specs a process keeps (Pipelines.specs)


class CancelledError(Exception):
    """The job was cancelled while this stage ran."""


@dataclass
class Pipelines:
    """What the pipeline tasks and the reaper work with: the job store, the signed records, the queue."""

    store: PipelineStore
    records: Records
    queue: TaskQueue
    settings: Settings
    # Specs read and verified so far, by job (a spec never changes once signed): every chunk of a
    # job, and every reaper round, would otherwise fetch its pipeline.json (ids of the whole data set).
    specs: dict[str, PipelineSpec] = field(default_factory=dict)

    @classmethod
    def connect(cls, settings: Settings, store: PipelineStore | None = None, storage: Storage | None = None,
                ) -> Pipelines:
        store = store or PipelineStore(redis.Redis.from_url(settings.state_redis_url, decode_responses=True),
                                       settings.job_ttl_s, patience_s=OUTAGE_WAIT_S)
        return cls(store, Records(storage or settings.storage(), settings.signing_key()), TaskQueue(settings, app),
                   settings)

    def spec(self, job_id: str) -> PipelineSpec:
        if job_id not in self.specs:
            if len(self.specs) >= SPECS_KEPT:
                self.specs.pop(next(iter(self.specs)))
            self.specs[job_id] = PipelineSpec.model_validate(self.records.get(pipeline_key(job_id, PIPELINE_SPEC)))
        return self.specs[job_id]

    def advance(self, job_id: str, spec: PipelineSpec) -> None:
        """Send what runs next (the one decision: :meth:`PipelineStore.advance`)."""
        self.queue.send_pipeline(job_id, self.store.advance(job_id, spec, self.settings.visibility_timeout_s))

    def ensure(self, job_id: str) -> PipelineSpec | None:
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
def pipes() -> Pipelines:
    """This worker process's, on the process's own clients (the tasks')."""
    rt = runtime()
    return Pipelines.connect(rt.settings, PipelineStore(rt.store.r, rt.settings.job_ttl_s, OUTAGE_WAIT_S),
                             rt.storage)


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


def deliver(task: Task, job_id: str, send: Send, body: Callable[[PipelineSpec], None]) -> None:
    """Run ``body`` as the only live copy of ``send``'s unit, once its delivery is counted; then send
    what runs next. A copy delivered while another holds the lease is dropped (if that one dies, the
    reaper sends the unit again); a delivery past the attempts budget fails the unit instead."""
    p = pipes()
    store, settings = p.store, p.settings
    spec = p.ensure(job_id)
    if spec is None:
        log.warning("job %s: no such pipeline job (expired, or never written by this service); dropped", job_id)
        return
    token = f"{task.request.hostname}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    if not store.claim(job_id, send.unit, token, settings.lease_s):
        return
    try:
        with beating(lambda: store.renew(job_id, send.unit, token, settings.lease_s), settings.lease_s / 4,
                     "rib-lease"):
            verdict = store.start(job_id, send, settings.max_stage_attempts)
            if verdict == "dead":
                fail_unit(job_id, spec, send, f"its worker stopped {settings.max_stage_attempts} times while running "
                                              "it (killed, or out of memory); not retried")
            elif verdict == "run":
                body(spec)
    finally:
        store.release(job_id, send.unit, token)
    if not store.exists(job_id):  # Redis lost the job while this ran: rebuild it (it advances)
        p.ensure(job_id)
    else:
        p.advance(job_id, spec)


def fail_unit(job_id: str, spec: PipelineSpec, send: Send, reason: str) -> None:
    log.error("job %s: %s: %s", job_id, send.unit, reason)
    if send.chunk is None:
        pipes().store.finish(job_id, send.stage, "failed", error=reason)
    else:
        count_chunk(job_id, spec, send.chunk, dict.fromkeys(spec.chunks[send.chunk], reason))


def pull(rt: Runtime, job_id: str, folder: str, work: Path) -> None:
    """Copy the job's ``folder`` from storage into ``work`` (each file written whole, then renamed)."""
    root = pipeline_key(job_id)
    for key in rt.storage.list(pipeline_key(job_id, folder) + "/"):
        path = work / key[len(root):]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_bytes(rt.storage.get(key))
        os.replace(tmp, path)


def push(rt: Runtime, job_id: str, work: Path, folder: str, only: Callable[[Path], bool] = lambda p: True) -> None:
    """Copy ``work/folder`` to the job's prefix in storage (every object is written whole)."""
    for path in sorted((work / folder).rglob("*")):
        if path.is_file() and not path.name.startswith(".") and only(path):
            rt.storage.put(pipeline_key(job_id, path.relative_to(work).as_posix()), path.read_bytes())


def write_inputs(job_id: str, spec: PipelineSpec, work: Path, validation: bool = False) -> Path:
    """A frozen manifest (the data set, or the classifier's validation set) as a checked local file,
    for the stages that read one by path."""
    key, digest = ((PIPELINE_VAL_MANIFEST, spec.val_manifest_sha256) if validation
                   else (PIPELINE_MANIFEST, spec.manifest_sha256))
    path = work / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(frozen_text(pipeline_key(job_id, key), digest))
    return path


def classifier_uri(rt: Runtime, job_id: str, spec: PipelineSpec) -> str:
    return spec.classifier_uri or rt.storage.uri(pipeline_key(job_id, "classifier/classifier.pth"))


def show_progress(job_id: str, stage: str, **values: Any) -> None:
    """Show a training stage's progress; stop it (:class:`CancelledError`) if the job was cancelled."""
    store = pipes().store
    store.progress(job_id, stage, **values)
    if store.cancelled(job_id):
        raise CancelledError(f"cancelled at {values}")


def epoch_hook(rt: Runtime, job_id: str, stage: str, work: Path, state: str, epochs: int) -> Callable[[int], None]:
    """After each epoch: store the training state (``state``, relative to ``work``), show the
    progress, and stop if the job was cancelled."""

    def after_epoch(epoch: int) -> None:
        rt.storage.put(pipeline_key(job_id, state), (work / state).read_bytes())
        show_progress(job_id, stage, epoch=epoch, epochs=epochs)

    return after_epoch


def run_classifier(rt: Runtime, job_id: str, spec: PipelineSpec, work: Path, device: str) -> dict[str, Any]:
    from rib_core.jobs.stages import classifier_stage

    pull(rt, job_id, "classifier", work)
    val = write_inputs(job_id, spec, work, validation=spec.val_manifest is not None)
    hook = epoch_hook(rt, job_id, "classifier", work, "classifier/train_state.pth", spec.classifier.epochs)
    report = classifier_stage(work, frozen_manifest(job_id, spec), spec.classifier, val, device, hook,
                              classifier_uri(rt, job_id, spec))
    push(rt, job_id, work, "classifier", lambda p: p.name != "train_state.pth")
    return report


def run_refine(rt: Runtime, job_id: str, spec: PipelineSpec, work: Path, device: str) -> dict[str, Any]:
    from rib_core.jobs.stages import refine_stage

    pull(rt, job_id, "maps", work)
    pull(rt, job_id, "refined", work)
    hook = epoch_hook(rt, job_id, "refine", work, "refined/irn_state.pth", spec.refine.irn.epochs)
    report = refine_stage(work, frozen_manifest(job_id, spec), classifier_uri(rt, job_id, spec), spec.refine,
                          device, hook)
    push(rt, job_id, work, "refined")
    index = pipeline_index(job_id, spec.image_ids, rt.storage.list(pipeline_key(job_id)))
    rt.storage.put(pipeline_key(job_id, PIPELINE_INDEX), json.dumps(index, indent=1).encode(), "application/json")
    return report


def run_deeplab(rt: Runtime, job_id: str, spec: PipelineSpec, work: Path, device: str) -> dict[str, Any]:
    from rib_core.jobs.stages import deeplab_stage

    assert spec.deeplab is not None  # the job has this stage only when DeepLab was asked for
    manifest = frozen_manifest(job_id, spec)
    truth = str(write_inputs(job_id, spec, work)) if any(r.mask for r in manifest.records) else None
    steps = spec.deeplab.iterations
    return deeplab_stage(rt.storage.uri(pipeline_key(job_id, "refined/masks.jsonl")),
                         rt.storage.uri(pipeline_key(job_id, "deeplab")), spec.deeplab, truth, device,
                         lambda entry: show_progress(job_id, "deeplab", **entry, steps=steps))


RUNNERS: dict[str, Callable[[Runtime, str, PipelineSpec, Path, str], dict[str, Any]]] = {
    "classifier": run_classifier, "refine": run_refine, "deeplab": run_deeplab}
assert set(RUNNERS) == {s.name for s in STAGE.values() if s.task == PIPELINE_STAGE}


def run_stage(job_id: str, stage: str, spec: PipelineSpec) -> None:
    """One training stage; its report in storage means it is done. Whatever it raises fails it."""
    rt, store = runtime(), pipes().store
    if store.cancelled(job_id):
        store.stop_all(job_id)
        return
    marker = pipeline_key(job_id, stage_marker(stage))
    if rt.storage.exists(marker):  # finished before (a redelivery, a restart)
        store.finish(job_id, stage, "done", json.loads(rt.storage.get(marker)))
        return
    try:
        device = str(resolve_device(rt.settings.device))
        with tempfile.TemporaryDirectory(prefix=f"rib-{job_id}-{stage}-") as tmp:
            report = RUNNERS[stage](rt, job_id, spec, Path(tmp), device)
    except CancelledError:
        store.stop_all(job_id)
        return
    except (Exception, MemoryError) as e:  # MemoryError would take the worker down: it fails the stage
        log.exception("job %s: stage %s failed", job_id, stage)
        store.finish(job_id, stage, "failed", error=f"{type(e).__name__}: {e}")
        return
    text = json.dumps(report, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    rt.storage.put(marker, text.encode(), "application/json")
    store.finish(job_id, stage, "done", json.loads(text))


@app.task(name=PIPELINE_STAGE, bind=True, acks_late=True, ignore_result=True)
def pipeline_stage(self: Task, job_id: str, stage: str) -> None:
    """One training stage of a pipeline job."""
    if stage not in RUNNERS:
        log.error("job %s: no stage %r; dropped", job_id, stage)
        return
    deliver(self, job_id, Send(stage), lambda spec: run_stage(job_id, stage, spec))  # type: ignore[arg-type]


def count_chunk(job_id: str, spec: PipelineSpec, chunk: int, failures: dict[str, str]) -> None:
    """Keep the chunk's marker in storage (a rebuilt job counts it), then count it once in Redis;
    the chunk that completes the maps stage records the stage done."""
    rt, store = runtime(), pipes().store
    rt.storage.put(pipeline_key(job_id, chunk_marker(chunk)), json.dumps({"failures": failures}).encode(),
                   "application/json")
    if store.chunk_done(job_id, chunk, failures, len(spec.chunks)) == 1:
        store.maps_complete(job_id, spec, rt.storage)


def run_chunk(job_id: str, chunk: int, spec: PipelineSpec) -> None:
    """RIB maps of one chunk's images; maps already in storage are kept."""
    rt, store = runtime(), pipes().store
    failures: dict[str, str] = {}
    if not store.cancelled(job_id):
        ids = spec.chunks[chunk]
        todo = [i for i in ids if not rt.storage.exists(pipeline_key(job_id, f"maps/{i}.npz"))]
        failures = _maps(rt, job_id, spec, todo) if todo else {}
    count_chunk(job_id, spec, chunk, failures)


@app.task(name=PIPELINE_MAPS, bind=True, acks_late=True, ignore_result=True)
def pipeline_maps(self: Task, job_id: str, chunk: int) -> None:
    """RIB maps of one chunk of a pipeline job's images."""
    deliver(self, job_id, Send("maps", chunk), lambda spec: run_chunk(job_id, chunk, spec))


def _maps(rt: Runtime, job_id: str, spec: PipelineSpec, todo: list[str]) -> dict[str, str]:
    """Run the chunk's images; store each map written, return the images that failed, with why."""
    from rib_core.jobs.stages import maps_stage

    device = str(resolve_device(rt.settings.device))
    with tempfile.TemporaryDirectory(prefix=f"rib-{job_id}-maps-") as tmp:
        work = Path(tmp)
        error = ""
        try:
            maps_stage(work, frozen_manifest(job_id, spec), todo, classifier_uri(rt, job_id, spec), spec.rib, device,
                       cache_bytes=rt.settings.companion_cache_bytes, disk_cache=rt.settings.companion_disk_cache)
        except (Exception, MemoryError) as e:  # per image below: the maps written are kept
            error = f"{type(e).__name__}: {e}"
            log.warning("job %s: maps of %s: %s", job_id, todo, error)
        push(rt, job_id, work, "maps", lambda p: p.suffix == ".npz")
        return {i: error or "no map written" for i in todo if not (work / "maps" / f"{i}.npz").exists()}


@signals.worker_ready.connect
def start_pipeline_reaper(**_: Any) -> None:
    """The pipeline reaper in every worker's main process, on clients of its own."""
    settings = get_settings()
    every(settings.lease_s / 2, Pipelines.connect(settings).reap, "rib-pipeline-reaper")
