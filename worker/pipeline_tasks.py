"""The tasks of staged jobs: a training stage of a pipeline job and the one stage of a training job
(training queue), a chunk of RIB maps and a chunk of an image job's images (image queue).

All are thin: run the stage (:mod:`worker.stage_runners`), store its report
(``stages/<stage>.json``, last) and record the unit's state in Redis; then ask
:meth:`contract.pipelines.PipelineStore.advance` what runs next and send it. A stage whose report
is in storage is not run again.

Nothing a stage raises takes its worker down or comes back: any exception, MemoryError included,
fails the stage (or the chunk's images) with the reason, and the message is acknowledged. A
delivery whose worker died is counted (:meth:`PipelineStore.start`): past
``RIB_MAX_STAGE_ATTEMPTS`` (``RIB_MAX_ATTEMPTS`` for a chunk of images) the unit fails with that
reason instead of running again.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Task, signals

from contract.job_kinds import IMAGE, PIPELINE, TRAINING, JobKind
from contract.settings import get_settings
from contract.stages import (
    PIPELINE_MAPS,
    PIPELINE_STAGE,
    PROCESS_CHUNK,
    STAGE,
    TRAINING_JOB,
    PipelineSpec,
    Send,
    chunk_stage,
)
from rib_core.io.artifacts import pipeline_key, stage_marker
from rib_core.jobs.pipeline import resolve_device
from worker import image_chunks, staged
from worker.celery_app import app
from worker.stage_runners import RUNNERS, chunk_maps
from worker.staged import CancelledError, Pipelines
from worker.tasks import beating, every, runtime

log = logging.getLogger(__name__)


def deliver(task: Task, p: Pipelines, job_id: str, send: Send, body: Callable[[Any], None]) -> None:
    """Run ``body`` as the only live copy of ``send``'s unit, once its delivery is counted; then send
    what runs next. A copy delivered while another holds the lease is dropped (if that one dies, the
    reaper sends the unit again, or the broker redelivers a chunk of images); a delivery past the
    attempts budget fails the unit instead."""
    store, settings = p.store, p.settings
    spec = p.ensure(job_id)
    if spec is None:
        log.warning("job %s: no such %s job (expired, or never written by this service); dropped", job_id,
                    store.kind.name)
        return
    token = f"{task.request.hostname}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    # A chunk of images the broker delivers again had its worker die (lost, past its time limit, or
    # silent past the visibility timeout): it takes the dead delivery's lease over at once (its
    # images done are skipped), as a stage waits for the lease to lapse.
    redelivered = bool((task.request.delivery_info or {}).get("redelivered"))
    if not store.claim(job_id, send.unit, token, settings.lease_s, take_over=store.kind.per_image and redelivered):
        return
    attempts = settings.max_stage_attempts
    if store.kind.per_image:  # each image is bounded on its own (image_chunks.claim); every death is charged
        # to the images it was running, and one more delivery fails the last of them and counts the chunk
        attempts = settings.max_attempts * len(spec.chunk_items(send.chunk or 0)) + 1
    try:
        with beating(lambda: store.renew(job_id, send.unit, token, settings.lease_s), settings.lease_s / 4,
                     "rib-lease"):
            verdict = store.start(job_id, send, attempts)
            if verdict == "dead" and store.kind.per_image:
                image_chunks.give_up(job_id, spec, send, attempts)  # type: ignore[arg-type]
            elif verdict == "dead":
                fail_unit(p, job_id, spec, send, f"its worker stopped {attempts} times while "
                                                 "running it (killed, or out of memory); not retried")
            elif verdict == "run":
                body(spec)
    finally:
        store.release(job_id, send.unit, token)
    if not store.exists(job_id):  # Redis lost the job while this ran: rebuild it (it advances)
        p.ensure(job_id)
    else:
        p.advance(job_id, spec)


def fail_unit(p: Pipelines, job_id: str, spec: Any, send: Send, reason: str) -> None:
    log.error("job %s: %s: %s", job_id, send.unit, reason)
    if send.chunk is None:
        p.store.finish(job_id, send.stage, "failed", error=reason)
    else:
        p.store.count_chunk(job_id, spec, send, dict.fromkeys(spec.chunks[send.chunk], reason), runtime().storage)


def run_stage(p: Pipelines, job_id: str, stage: str, spec: Any) -> None:
    """One stage on the training queue; its report in storage means it is done. Whatever it raises
    fails it."""
    rt, store = runtime(), p.store
    if store.cancelled(job_id):
        store.stop_all(job_id)
        return
    marker = store.kind.folder(job_id, stage_marker(stage))
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


def run_staged(task: Task, kind: JobKind, job_id: str, stage: str) -> None:
    """One delivery of a stage on the training queue, for a job of ``kind``."""
    if stage not in RUNNERS or STAGE[stage].job != kind.name:
        log.error("job %s: no %s stage %r; dropped", job_id, kind.name, stage)
        return
    p = staged.pipes(kind)
    deliver(task, p, job_id, Send(stage), lambda spec: run_stage(p, job_id, stage, spec))  # type: ignore[arg-type]


@app.task(name=PIPELINE_STAGE, bind=True, acks_late=True, ignore_result=True)
def pipeline_stage(self: Task, job_id: str, stage: str) -> None:
    """One training stage of a pipeline job."""
    run_staged(self, PIPELINE, job_id, stage)


@app.task(name=TRAINING_JOB, bind=True, acks_late=True, ignore_result=True)
def training_job(self: Task, job_id: str, stage: str) -> None:
    """The one stage of an offline training job (train, evaluate or predict DeepLab)."""
    run_staged(self, TRAINING, job_id, stage)


def run_chunk(job_id: str, send: Send, spec: PipelineSpec) -> None:
    """RIB maps of one chunk's images; maps already in storage are kept. The chunk that completes
    the maps stage records it done."""
    rt, store = runtime(), staged.pipes().store
    failures: dict[str, str] = {}
    if not store.cancelled(job_id):
        ids = spec.chunks[send.chunk or 0]
        todo = [i for i in ids if not rt.storage.exists(pipeline_key(job_id, f"maps/{i}.npz"))]
        failures = chunk_maps(rt, job_id, spec, todo) if todo else {}
    store.count_chunk(job_id, spec, send, failures, rt.storage)


@app.task(name=PIPELINE_MAPS, bind=True, acks_late=True, ignore_result=True)
def pipeline_maps(self: Task, job_id: str, chunk: int) -> None:
    """RIB maps of one chunk of a pipeline job's images."""
    send = Send(chunk_stage(PIPELINE_MAPS), chunk)
    deliver(self, staged.pipes(), job_id, send, lambda spec: run_chunk(job_id, send, spec))


@app.task(name=PROCESS_CHUNK, bind=True, acks_late=True, ignore_result=True,
          time_limit=get_settings().chunk_time_limit_s)
def process_chunk(self: Task, job_id: str, chunk: int) -> None:
    """One chunk of an image job's images (:mod:`worker.image_chunks`)."""
    send = Send(chunk_stage(PROCESS_CHUNK), chunk)
    deliver(self, staged.pipes(IMAGE), job_id, send, lambda spec: image_chunks.run_images(job_id, send, spec))


@signals.worker_ready.connect
def start_reapers(**_: Any) -> None:
    """A reaper for each kind of staged job in every worker's main process, on clients of its own:
    jobs keep moving with no other process running (no Celery beat needed)."""
    settings = get_settings()
    for kind in (PIPELINE, TRAINING, IMAGE):
        every(settings.lease_s / 2, Pipelines.connect(settings, kind).reap, f"rib-{kind.name}-reaper")
