"""The Celery application (``worker.celery_app:app``): Redis broker and result backend, two queues.

Delivery is at-least-once and the tasks are idempotent: a task is acknowledged only after it
finished (``acks_late``), a worker takes one task at a time (prefetch 1), a task whose worker
process died or that hit its hard time limit goes back to the queue (``task_reject_on_worker_lost``,
``task_acks_on_timeout=False``; each image's attempts are bounded by ``RIB_MAX_ATTEMPTS``), and
Redis hands a task that stays unacknowledged past the visibility timeout (its worker was killed)
to another worker. The API sends tasks by name and never imports the task code (the model, the
pipeline).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery

from service.jobs import JobItem
from service.settings import get_settings

PROCESS_CHUNK = "rib.process_chunk"
TRAINING_JOB = "rib.training_job"

settings = get_settings()
app = Celery("rib", broker=settings.broker_url, backend=settings.result_backend, include=["worker.tasks"])
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_acks_on_timeout=False,
    worker_prefetch_multiplier=1,
    broker_transport_options={
        "visibility_timeout": settings.visibility_timeout_s,
        # Look for tasks of dead workers about ten times per visibility timeout (kombu: every 100 s).
        "unacked_restore_interval": min(60, max(1, settings.visibility_timeout_s // 10)),
        "unacked_restore_throttle": 1,
    },
    broker_connection_retry_on_startup=True,
    task_default_queue=settings.image_queue,
    task_routes={PROCESS_CHUNK: {"queue": settings.image_queue}, TRAINING_JOB: {"queue": settings.training_queue}},
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_track_started=True,
    result_expires=settings.job_ttl_s,
)


def send_chunks(job_id: str, items: Sequence[JobItem], rib: dict[str, Any], **options: Any) -> None:
    """Queue a job's images in chunks of ``RIB_CHUNK_SIZE`` on the image queue."""
    size = settings.chunk_size
    for start in range(0, len(items), size):
        chunk = [it.to_json() for it in items[start:start + size]]
        app.send_task(PROCESS_CHUNK, args=[job_id, chunk, rib], queue=settings.image_queue,
                      task_id=f"{job_id}-{uuid.uuid4().hex[:8]}", **options)
