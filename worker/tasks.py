"""The two tasks: RIB on a chunk of images (image queue), and an offline DeepLab job (training queue).

Both are thin: they read inputs, call rib_core, and store what it returns. The pipeline (shared
classifier, decoded companion pool, optional IRN) is loaded once per worker process, on its first
task, and reused for every image after that.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from botocore.exceptions import ClientError, EndpointConnectionError
from redis.exceptions import ConnectionError as RedisConnectionError

from rib_core.datasets import ImageError, decode_image
from rib_core.pipeline import PseudoMaskPipeline, resolve_device
from rib_core.rib_config import RibConfig
from rib_core.storage import Storage, read_bytes
from service.jobs import MARKER, JobItem, JobStore, image_key
from service.settings import Settings, get_settings
from worker.celery_app import PROCESS_CHUNK, TRAINING_JOB, app

log = logging.getLogger(__name__)
_INPUT_ERRORS = (ImageError, ValueError, ClientError)


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
def pipeline() -> PseudoMaskPipeline:
    """The model of this process, loaded on first use; a failed load is retried on the next image."""
    s = runtime().settings
    if not s.classifier_uri or not s.companion_manifest_uri:
        raise RuntimeError("RIB_CLASSIFIER_URI and RIB_COMPANION_MANIFEST_URI must be set on the worker")
    started = time.perf_counter()
    pipe = PseudoMaskPipeline.load(s.classifier_uri, s.companion_manifest_uri, s.irn_uri, device=s.device)
    log.info("pipeline loaded in %.1f s on %s (%d classes)", time.perf_counter() - started, pipe.device,
             len(pipe.classes))
    return pipe


def process_items(rt: Runtime, job_id: str, items: list[JobItem], rib: RibConfig) -> None:
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
                                [item.id for item, _ in ready])
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
        for name in sorted(artifacts, key=lambda n: n == MARKER):
            data, content_type = artifacts[name]
            rt.storage.put(image_key(job_id, item.id, name), data, content_type)
        rt.store.mark_done(job_id, item.id, artifacts, seconds + time.perf_counter() - image_started)


@app.task(name=PROCESS_CHUNK, ignore_result=True, time_limit=get_settings().chunk_time_limit_s,
          autoretry_for=(RedisConnectionError, EndpointConnectionError), retry_backoff=True, max_retries=5)
def process_chunk(job_id: str, items: list[dict[str, Any]], rib: dict[str, Any]) -> None:
    """Images of one job. Safe to run again: finished images are not redone.

    The plain engine claims and finishes one image at a time, so a killed worker leaves at most one
    image to redo; the batched engine claims the whole chunk, which then runs together.
    """
    rt = runtime()
    cfg = RibConfig.model_validate(rib)
    chunk = [JobItem.from_json(raw) for raw in items]
    group = len(chunk) if cfg.batched(str(resolve_device(rt.settings.device))) else 1
    for start in range(0, len(chunk), group):
        todo = [item for item in chunk[start:start + group] if claim(rt, job_id, item)]
        if todo:
            process_items(rt, job_id, todo, cfg)
    rt.store.finalize(job_id, rt.storage)


def claim(rt: Runtime, job_id: str, item: JobItem) -> bool:
    """Mark the image running; False when there is nothing to do (cancelled, already accounted, or
    an earlier attempt wrote every file, which is then recorded as done)."""
    if rt.store.begin(job_id, item.id) != "run":
        return False
    if rt.storage.exists(image_key(job_id, item.id, MARKER)):
        names = [key.rsplit("/", 1)[1] for key in rt.storage.list(image_key(job_id, item.id))]
        rt.store.mark_done(job_id, item.id, names, None)
        return False
    return True


@app.task(name=TRAINING_JOB, bind=True)
def training_job(self: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """An offline DeepLab job (train, evaluate or predict) on this worker's device."""
    from rib_core.train_deeplab import run_training_job

    log.info("training job %s: %s", self.request.id, spec)
    return run_training_job({**spec, "device": str(resolve_device(runtime().settings.device))})
