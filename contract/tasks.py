"""The task contract: the Celery app's configuration and the client that queues tasks by name.

The API queues tasks through :class:`TaskQueue` and never imports the task code (the model, the
pipeline, torch); the worker registers its tasks under the names of the stage registry
(:data:`contract.stages.STAGES`). Every task carries only a job id and its unit (a stage, or a
chunk number): what the job runs is its signed record in storage. Payloads cross the broker as JSON.

Delivery is at-least-once and the tasks are idempotent: a task is acknowledged only after it
finished (``acks_late``), a worker takes one task at a time (prefetch 1), a task whose worker
process died or that hit its hard time limit goes back to the queue (``task_reject_on_worker_lost``,
``task_acks_on_timeout=False``; each unit's deliveries are bounded: :mod:`contract.pipelines`), and
Redis hands a task that stays unacknowledged past the visibility timeout (its worker was killed)
to another worker.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from celery import Celery

from contract.settings import Settings
from contract.stages import STAGE, STAGES, Send, StageDef

FAN_OUT_INLINE = 64  # units a request sends itself; the rest go with the next task's or the reaper's advance


def queue_of(stage: StageDef, settings: Settings) -> str:
    """The queue a stage's tasks run on (``RIB_TRAINING_QUEUE`` or ``RIB_IMAGE_QUEUE``)."""
    return settings.training_queue if stage.queue == "training" else settings.image_queue


def make_celery(settings: Settings, include: Sequence[str] = ()) -> Celery:
    """The Celery app of the API (which only sends) and of the workers (which ``include`` their tasks)."""
    app = Celery("rib", broker=settings.broker_url, backend=settings.result_backend, include=list(include))
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
        task_routes={s.task: {"queue": queue_of(s, settings)} for s in STAGES},
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_track_started=True,
        result_expires=settings.job_ttl_s,
    )
    return app


class TaskQueue:
    """Sends tasks by name: the units of every staged job (pipeline, training and image jobs)."""

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        self.settings = settings
        self.app = app or make_celery(settings)

    def send_pipeline(self, job_id: str, sends: Sequence[Send]) -> None:
        """Send the units :meth:`contract.pipelines.PipelineStore.advance` decided on: a stage, or a
        chunk of a chunked stage, on its stage's queue (``STAGE``)."""
        for send in sends:
            stage = STAGE[send.stage]
            args = [job_id, send.stage] if send.chunk is None else [job_id, send.chunk]
            self.app.send_task(stage.task, args=args, queue=queue_of(stage, self.settings),
                               task_id=f"{job_id}-{send.unit}-{uuid.uuid4().hex[:8]}")
