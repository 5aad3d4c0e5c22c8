"""What every worker process shares: its clients (:func:`runtime`), the model (loaded once per
process, on its first image), the threads of its main process (the staged jobs' reapers, the
webhook sender, the classifier report) and the torch thread count.

The tasks themselves are :mod:`worker.pipeline_tasks`' (every job is a staged job); what a chunk of
an image job runs is :mod:`worker.image_chunks`'.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import redis
from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError
from celery import signals
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from contract.settings import Settings, get_settings
from contract.webhooks import deliver_due
from contract.worker_reports import record_classifier
from rib_core.io.storage import Storage
from rib_core.jobs.pipeline import PseudoMaskPipeline
from rib_core.runtime.threads import use_torch_threads

log = logging.getLogger(__name__)
# Redis or S3 out of reach: a chunk waits for them and carries on (it is idempotent).
OUTAGES = (RedisConnectionError, RedisTimeoutError, EndpointConnectionError, ConnectionClosedError,
           ReadTimeoutError)


@dataclass
class Runtime:
    settings: Settings
    r: redis.Redis
    storage: Storage


@cache
def runtime() -> Runtime:
    """Clients of this worker process (created after the fork, never shared across processes)."""
    settings = get_settings()
    settings.export_s3_endpoint()
    return Runtime(settings, redis.Redis.from_url(settings.state_redis_url, decode_responses=True), settings.storage())


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


@contextmanager
def beating(beat: Callable[[], object], every_s: float, name: str) -> Iterator[None]:
    """Call ``beat`` every ``every_s`` from a thread while the block runs (the model computes in the
    main one); a killed process stops beating. A beat lost to an outage is retried at the next one."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            try:
                beat()
            except OUTAGES:
                log.warning("%s: a beat failed (an outage); the next one tries again", name)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@signals.worker_ready.connect
def start_reaper(**_: Any) -> None:
    """The threads of every worker's main process (the staged jobs' reapers are started by
    :func:`worker.pipeline_tasks.start_reapers`): the classifier report and the webhook sender, on
    clients of their own, never shared with pool processes."""
    settings = get_settings()
    settings.export_s3_endpoint()  # the classifier is read from s3:// like the model
    r = redis.Redis.from_url(settings.state_redis_url, decode_responses=True)
    # reads the checkpoint (S3, torch): off the start-up path
    threading.Thread(target=report_classifier, args=(r, settings), name="rib-classifier", daemon=True).start()
    if settings.webhook_secret is not None:
        # each worker sends the callbacks that are due (contract.webhooks.deliver_due): one slow
        # receiver holds up only the worker sending to it
        every(1.0, lambda: deliver_due(r, settings), "rib-webhooks")
    log.info("torch: %d thread(s) per worker process", _threads)


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


def report_classifier(r: redis.Redis, settings: Settings) -> None:
    """Tell the API which classifier this worker serves and its recorded validation mAP (read from
    the checkpoint's ``extra``; the API shows it on /readyz without loading torch). A failure is
    logged: the images report a model that cannot be loaded themselves."""
    if not settings.classifier_uri:
        return
    from rib_core.classifier.evaluate import classifier_quality

    try:
        quality = classifier_quality(settings.classifier_uri)
        record_classifier(r, {"uri": settings.classifier_uri, "val_map": quality["val_map"],
                                 "val_manifest": quality["val_manifest"], "warning": quality["warning"]})
    except Exception as e:
        log.warning("cannot read the classifier %s: %s: %s", settings.classifier_uri, type(e).__name__, e)


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
