"""What a chunk of an image job runs (the ``images`` stage, image queue): RIB and refinement on
each of its images not yet accounted for, each image's files stored (``meta.json`` last) and its
state recorded as it finishes, so that a chunk delivered again (its worker killed) redoes only the
image it was on. Its delivery (lease, attempts, dead letter, what runs next) is the staged jobs'
(:func:`worker.pipeline_tasks.deliver`), as for a pipeline's chunk of maps.

The pipeline (shared classifier, decoded companion pool, optional IRN) is loaded once per worker
process, on its first image (:func:`worker.tasks.pipeline`). A chunk that loses Redis or S3 waits
for them and carries on; a chunk past its hard time limit is delivered again, the limit noted as
the reason its images fail with if every delivery dies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from billiard.exceptions import TimeLimitExceeded
from botocore.exceptions import ClientError
from celery import signals

from contract.job_kinds import IMAGE
from contract.job_requests import ImageJobSpec, JobItem
from contract.pipelines import PipelineStore
from contract.settings import get_settings
from contract.stages import PROCESS_CHUNK, Send, chunk_stage
from rib_core.config.rib_config import RibConfig, RibPlan
from rib_core.config.stage_configs import RefineConfig
from rib_core.data.datasets import ImageError, decode_image
from rib_core.io.artifacts import MARKER, image_key, store_result
from rib_core.io.storage import read_bytes
from rib_core.jobs.pipeline import resolve_device
from worker import staged
from worker.tasks import OUTAGES, Runtime, pipeline, runtime

log = logging.getLogger(__name__)
_INPUT_ERRORS = (ImageError, ValueError, ClientError)


def process_items(rt: Runtime, store: PipelineStore, job_id: str, items: Sequence[JobItem], rib: RibConfig,
                  plan: RibPlan, refine: RefineConfig) -> None:
    """RIB and refinement for a chunk's images, batched where the task's ``plan`` says (by default
    on CUDA); each image's artifacts are all written before its marker."""
    try:
        pipe = pipeline()
    except Exception as e:  # any load failure is reported on the images, not hidden in a worker log
        for item in items:
            store.mark_failed(job_id, item.id, f"the worker cannot load the model: {type(e).__name__}: {e}")
        return
    started = time.perf_counter()  # the images' own time, without the one-off model load
    ready: list[tuple[JobItem, np.ndarray]] = []
    for item in items:
        try:
            ready.append((item, decode_image(read_bytes(item.image), rt.settings.max_image_pixels)))
        except FileNotFoundError:
            store.mark_failed(job_id, item.id, f"image not found: {item.image}")
        except _INPUT_ERRORS as e:
            store.mark_failed(job_id, item.id, f"cannot use {item.image}: {e}")
    results = pipe.process_many([image for _, image in ready], [item.labels for item, _ in ready], rib,
                                [item.id for item, _ in ready], refine, plan)
    seconds = (time.perf_counter() - started) / max(len(ready), 1)
    for (item, image), result in zip(ready, results, strict=True):
        image_started = time.perf_counter()
        try:
            if isinstance(result, Exception):  # one image's failure (bad labels, out of memory) stops no other
                raise result
            artifacts = result.artifacts(image)
        except Exception as e:
            log.error("image %s of job %s failed: %s: %s", item.id, job_id, type(e).__name__, e)
            store.mark_failed(job_id, item.id, f"{type(e).__name__}: {e}")
            continue
        store_result(rt.storage, job_id, item.id, artifacts)
        store.mark_done(job_id, item.id, artifacts, seconds + time.perf_counter() - image_started)


def claim(rt: Runtime, store: PipelineStore, job_id: str, send: Send, item: JobItem) -> bool:
    """Mark the image running; False when there is nothing to do (cancelled, already accounted, an
    earlier attempt wrote every file, which is then recorded as done, or its worker died on it on
    each of its ``RIB_MAX_ATTEMPTS`` attempts, which fails it alone: one image that kills its worker
    never takes the rest of its chunk down)."""
    verdict = store.begin(job_id, item.id, rt.settings.max_attempts)
    if verdict == "exhausted":
        store.mark_failed(job_id, item.id, store.lost_reason(job_id, send, rt.settings.max_attempts))
    if verdict != "run":
        return False
    if rt.storage.exists(image_key(job_id, item.id, MARKER)):
        names = [key.rsplit("/", 1)[1] for key in rt.storage.list(image_key(job_id, item.id))]
        store.mark_done(job_id, item.id, names, None)
        return False
    return True


def run_images(job_id: str, send: Send, spec: ImageJobSpec) -> None:
    """The chunk's images not accounted for yet, then the chunk counted (the chunk that completes the
    stage writes the job's index). The plain engine claims and finishes one image at a time, so a
    killed worker leaves at most one image to redo; the batched engine claims the whole chunk."""
    rt, store = runtime(), staged.pipes(IMAGE).store
    rib, refine = RibConfig.model_validate(spec.rib), RefineConfig.model_validate(spec.refine)
    chunk = spec.chunk_items(send.chunk or 0)
    plan = rib.plan(str(resolve_device(rt.settings.device)))  # resolved once for the task
    group = len(chunk) if plan.batched else 1
    pause = 1.0
    while True:
        try:
            for start in range(0, len(chunk), group):
                todo = [item for item in chunk[start:start + group] if claim(rt, store, job_id, send, item)]
                if todo:
                    process_items(rt, store, job_id, todo, rib, plan, refine)
            store.count_chunk(job_id, spec, send, {}, rt.storage)
            return
        except OUTAGES as e:  # the hard time limit bounds this wait
            log.warning("job %s: %s: %s; carrying on in %.0f s", job_id, type(e).__name__, e, pause)
            time.sleep(pause)
            pause = min(2 * pause, 30.0)


def give_up(job_id: str, spec: ImageJobSpec, send: Send, attempts: int) -> None:
    """Every delivery of the chunk died: its images not finished fail with the reason, then it is counted."""
    rt, store = runtime(), staged.pipes(IMAGE).store
    ids = [item.id for item in spec.chunk_items(send.chunk or 0)]
    store.give_up(job_id, ids, store.lost_reason(job_id, send, attempts), attempts)
    store.count_chunk(job_id, spec, send, {}, rt.storage)


@signals.task_failure.connect
def note_time_limit(sender: Any = None, args: Sequence[Any] = (), exception: BaseException | None = None,
                    **_: Any) -> None:
    """In the main process, when Celery killed a chunk at its hard time limit: that is the reason its
    images fail with if every delivery of it dies (Celery delivers it again; its attempts are bounded)."""
    if getattr(sender, "name", None) == PROCESS_CHUNK and isinstance(exception, TimeLimitExceeded):
        s = get_settings()
        store = PipelineStore.from_url(s.state_redis_url, s.job_ttl_s, kind=IMAGE)
        store.note_lost(args[0], Send(chunk_stage(PROCESS_CHUNK), int(args[1])),
                        f"exceeded the chunk time limit (RIB_CHUNK_TIME_LIMIT_S={s.chunk_time_limit_s} s)")
