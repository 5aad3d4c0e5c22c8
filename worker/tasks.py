"""The image job's tasks: RIB on a chunk of images, and the fan-out of a large job (image queue).

They are thin: they read inputs, call rib_core, and store what it returns. The pipeline (shared
classifier, decoded companion pool, optional IRN) is loaded once per worker process, on its first
task, and reused for every image after that.

Every worker also keeps jobs moving when a chunk is lost: a running chunk beats a heartbeat for its
images, and a reaper thread in each worker's main process hands out again (or fails, past
``RIB_MAX_ATTEMPTS``) the running images whose heartbeat is older than ``RIB_LEASE_S``. A chunk
that loses Redis or S3 waits for them and carries on; a chunk past its hard time limit is requeued
by Celery, and the image it was on is charged the attempt with that reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from billiard.exceptions import TimeLimitExceeded
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError, ReadTimeoutError
from celery import signals
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from contract.job_requests import JobItem
from contract.jobs import JobStore
from contract.settings import Settings, get_settings
from contract.tasks import FAN_OUT, PROCESS_CHUNK, ChunkPayload, TaskQueue
from contract.webhooks import deliver_due
from contract.worker_reports import record_classifier
from rib_core.config.rib_config import RibConfig
from rib_core.config.stage_configs import RefineConfig
from rib_core.data.datasets import ImageError, decode_image
from rib_core.io.artifacts import MARKER, image_key, store_result
from rib_core.io.storage import Storage, read_bytes
from rib_core.jobs.pipeline import PseudoMaskPipeline, resolve_device
from rib_core.runtime.threads import use_torch_threads
from worker.celery_app import app

log = logging.getLogger(__name__)
_INPUT_ERRORS = (ImageError, ValueError, ClientError)
# Redis or S3 out of reach: the chunk waits for them and carries on (it is idempotent).
_OUTAGES = (RedisConnectionError, RedisTimeoutError, EndpointConnectionError, ConnectionClosedError,
            ReadTimeoutError)


@dataclass
class Runtime:
    settings: Settings
    store: JobStore
    storage: Storage


@cache
def runtime() -> Runtime:
    """Clients of this worker process (created after the fork, never shared across processes)."""
    settings = get_settings()
    settings.export_s3_endpoint()
    return Runtime(settings, JobStore.from_url(settings.state_redis_url, settings.job_ttl_s), settings.storage())


@cache
def task_queue() -> TaskQueue:
    """This worker process's sender (the worker's own Celery app)."""
    return TaskQueue(runtime().settings, app)


@cache
def pipeline() -> PseudoMaskPipeline:
    """The model of this process, loaded on first use; a failed load is retried on the next image."""
    s = runtime().settings
    if not s.classifier_uri or not s.companion_manifest_uri:
        raise RuntimeError("RIB_CLASSIFIER_URI and RIB_COMPANION_MANIFEST_URI must be set on the worker")
    started = time.perf_counter()
    pipe = PseudoMaskPipeline.load(s.classifier_uri, s.companion_manifest_uri, s.irn_uri, device=s.device,
                                   cache_bytes=s.companion_cache_bytes, disk_cache=s.companion_disk_cache)
    log.info("pipeline loaded in %.1f s on %s (%d classes)", time.perf_counter() - started, pipe.device,
             len(pipe.classes))
    return pipe


def process_items(rt: Runtime, job_id: str, items: list[JobItem], rib: RibConfig, refine: RefineConfig) -> None:
    """RIB and refinement for a chunk's images, batched where ``rib.engine`` says (by default on
    CUDA); each image's artifacts are all written before its marker."""
    try:
        pipe = pipeline()
    except Exception as e:  # any load failure is reported on the images, not hidden in a worker log
        for item in items:
            rt.store.mark_failed(job_id, item.id, f"the worker cannot load the model: {type(e).__name__}: {e}")
        return
    started = time.perf_counter()  # the images' own time, without the one-off model load
    ready: list[tuple[JobItem, np.ndarray]] = []
    for item in items:
        try:
            ready.append((item, decode_image(read_bytes(item.image), rt.settings.max_image_pixels)))
        except FileNotFoundError:
            rt.store.mark_failed(job_id, item.id, f"image not found: {item.image}")
        except _INPUT_ERRORS as e:
            rt.store.mark_failed(job_id, item.id, f"cannot use {item.image}: {e}")
    results = pipe.process_many([image for _, image in ready], [item.labels for item, _ in ready], rib,
                                [item.id for item, _ in ready], refine)
    seconds = (time.perf_counter() - started) / max(len(ready), 1)
    for (item, image), result in zip(ready, results, strict=True):
        image_started = time.perf_counter()
        try:
            if isinstance(result, Exception):  # one image's failure (bad labels, out of memory) stops no other
                raise result
            artifacts = result.artifacts(image)
        except Exception as e:
            log.error("image %s of job %s failed: %s: %s", item.id, job_id, type(e).__name__, e)
            rt.store.mark_failed(job_id, item.id, f"{type(e).__name__}: {e}")
            continue
        store_result(rt.storage, job_id, item.id, artifacts)
        rt.store.mark_done(job_id, item.id, artifacts, seconds + time.perf_counter() - image_started)


@app.task(name=PROCESS_CHUNK, ignore_result=True, time_limit=get_settings().chunk_time_limit_s)
def process_chunk(payload: dict[str, Any]) -> None:
    """Images of one job (a :class:`~contract.tasks.ChunkPayload`). Safe to run again: finished
    images are not redone.

    The plain engine claims and finishes one image at a time, so a killed worker leaves at most one
    image to redo; the batched engine claims the whole chunk, which then runs together.
    """
    rt = runtime()
    task = ChunkPayload.model_validate(payload)
    job_id, chunk, cfg = task.job_id, task.items, task.rib
    group = len(chunk) if cfg.batched(str(resolve_device(rt.settings.device))) else 1
    pause = 1.0
    while True:
        try:
            with heartbeat(rt.store, job_id, [item.id for item in chunk], rt.settings.lease_s / 4):
                for start in range(0, len(chunk), group):
                    todo = [item for item in chunk[start:start + group] if claim(rt, job_id, item)]
                    if todo:
                        process_items(rt, job_id, todo, cfg, task.refine)
                rt.store.finalize(job_id, rt.storage)
            return
        except _OUTAGES as e:  # the hard time limit bounds this wait
            log.warning("job %s: %s: %s; carrying on in %.0f s", job_id, type(e).__name__, e, pause)
            time.sleep(pause)
            pause = min(2 * pause, 30.0)


@app.task(name=FAN_OUT, acks_late=True, ignore_result=True)
def fan_out(job_id: str, start: int) -> None:
    """Queue a large job's images from position ``start`` on, in pages, skipping those done (a job
    rebuilt from storage, a redelivery). A cancelled job is not queued further."""
    rt = runtime()
    page = 125 * rt.settings.chunk_size
    rib, refine = rt.store.rib(job_id), rt.store.refine(job_id)
    for offset in range(start, rt.store.total(job_id), page):
        if rt.store.cancelled(job_id):
            return
        task_queue().send_chunks(job_id, rt.store.pending_items(job_id, offset, page), rib, refine)


@contextmanager
def beating(beat: Callable[[], object], every_s: float, name: str) -> Iterator[None]:
    """Call ``beat`` every ``every_s`` from a thread while the block runs (the model computes in the
    main one); a killed process stops beating. A beat lost to an outage is retried at the next one."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            try:
                beat()
            except _OUTAGES:
                log.warning("%s: a beat failed (an outage); the next one tries again", name)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def heartbeat(store: JobStore, job_id: str, image_ids: Sequence[str], every_s: float,
              ) -> AbstractContextManager[None]:
    """Beat for the running ones of these images while the block runs; the reaper takes over the
    images of a process that stopped beating."""
    return beating(lambda: store.heartbeat(job_id, image_ids), every_s, "rib-heartbeat")


def claim(rt: Runtime, job_id: str, item: JobItem) -> bool:
    """Mark the image running; False when there is nothing to do (cancelled, already accounted, or
    an earlier attempt wrote every file, which is then recorded as done)."""
    if rt.store.begin(job_id, item.id, rt.settings.max_attempts) != "run":
        return False
    if rt.storage.exists(image_key(job_id, item.id, MARKER)):
        names = [key.rsplit("/", 1)[1] for key in rt.storage.list(image_key(job_id, item.id))]
        rt.store.mark_done(job_id, item.id, names, None)
        return False
    return True


def reap(store: JobStore, storage: Storage, queue: TaskQueue) -> None:
    """Hand out again the running images whose heartbeat is older than the lease, fail those past
    the attempt bound, and finish the jobs that leaves accounted for."""
    settings = queue.settings
    for job_id, items in store.reap(settings.lease_s, settings.max_attempts).items():
        if items:
            log.warning("job %s: %d image(s) lost their worker; queued again: %s", job_id, len(items),
                        [it.id for it in items])
            queue.send_chunks(job_id, items, store.rib(job_id), store.refine(job_id))
        store.finalize(job_id, storage)


@signals.worker_ready.connect
def start_reaper(**_: Any) -> None:
    """A reaper thread in every worker's main process: jobs keep moving with no other process
    running (no Celery beat needed). Its clients are its own, never shared with pool processes."""
    settings = get_settings()
    settings.export_s3_endpoint()  # the classifier is read from s3:// like the model
    store = JobStore.from_url(settings.state_redis_url, settings.job_ttl_s)
    storage = settings.storage()
    queue = TaskQueue(settings, app)

    # reads the checkpoint (S3, torch): off the start-up path, as the reaper's first round was before
    threading.Thread(target=report_classifier, args=(store, settings), name="rib-classifier", daemon=True).start()
    every(settings.lease_s / 2, lambda: reap(store, storage, queue), "rib-reaper")
    if settings.webhook_secret is not None:
        # each worker sends the callbacks that are due (contract.webhooks.deliver_due): one slow
        # receiver holds up only the worker sending to it
        every(1.0, lambda: deliver_due(store.r, settings), "rib-webhooks")
    log.info("torch: %d thread(s) per worker process; reaper: every %.0f s", _threads, settings.lease_s / 2)


def every(seconds: float, round_: Callable[[], None], name: str) -> None:
    """Run ``round_`` every ``seconds`` on a daemon thread of this process; a round that fails (an
    outage, a bug) is logged and the next one tries again."""

    def loop() -> None:
        while True:
            time.sleep(seconds)
            try:
                round_()
            except Exception:
                log.exception("%s: round failed", name)

    threading.Thread(target=loop, name=name, daemon=True).start()


def report_classifier(store: JobStore, settings: Settings) -> None:
    """Tell the API which classifier this worker serves and its recorded validation mAP (read from
    the checkpoint's ``extra``; the API shows it on /readyz without loading torch). A failure is
    logged: the images report a model that cannot be loaded themselves."""
    if not settings.classifier_uri:
        return
    from rib_core.classifier.evaluate import classifier_quality

    try:
        quality = classifier_quality(settings.classifier_uri)
        record_classifier(store.r, {"uri": settings.classifier_uri, "val_map": quality["val_map"],
                                 "val_manifest": quality["val_manifest"], "warning": quality["warning"]})
    except Exception as e:
        log.warning("cannot read the classifier %s: %s: %s", settings.classifier_uri, type(e).__name__, e)


@signals.task_failure.connect
def note_time_limit(sender: Any = None, args: Sequence[Any] = (), exception: BaseException | None = None,
                    **_: Any) -> None:
    """In the main process, when Celery killed a chunk at its hard time limit: the image it was on
    is charged with that reason (Celery requeues the chunk; the image's attempts are bounded)."""
    if getattr(sender, "name", None) == PROCESS_CHUNK and isinstance(exception, TimeLimitExceeded):
        task = ChunkPayload.model_validate(args[0])
        s = get_settings()
        JobStore.from_url(s.state_redis_url, s.job_ttl_s).note_lost(
            task.job_id, [item.id for item in task.items],
            f"exceeded the chunk time limit (RIB_CHUNK_TIME_LIMIT_S={s.chunk_time_limit_s} s)")


_threads = 1


@signals.worker_init.connect
def set_torch_threads(sender: Any = None, **_: Any) -> None:
    """Split this machine's cores among the worker's processes (``RIB_TORCH_THREADS`` overrides)."""
    global _threads
    _threads = use_torch_threads(get_settings().torch_threads, getattr(sender, "concurrency", 1) or 1)


@signals.worker_process_init.connect
def set_pool_torch_threads(**_: Any) -> None:
    """Pool processes apply the count their main process worked out."""
    use_torch_threads(_threads)
