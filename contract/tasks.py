"""The task contract: Celery task names, their typed payloads, and the client that queues them.

The API queues tasks by name through :class:`TaskQueue` and never imports the task code (the
model, the pipeline, torch); the worker registers its tasks under the same names and validates
each payload with the same models. Payloads cross the broker as JSON.

Delivery is at-least-once and the tasks are idempotent: a task is acknowledged only after it
finished (``acks_late``), a worker takes one task at a time (prefetch 1), a task whose worker
process died or that hit its hard time limit goes back to the queue (``task_reject_on_worker_lost``,
``task_acks_on_timeout=False``; each image's attempts are bounded by ``RIB_MAX_ATTEMPTS``), and
Redis hands a task that stays unacknowledged past the visibility timeout (its worker was killed)
to another worker.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery
from pydantic import BaseModel, ConfigDict, Field

from contract.job_requests import JobItem
from contract.settings import Settings
from contract.stages import PIPELINE_MAPS, PIPELINE_STAGE, STAGE, TRAINING_JOB, Send
from rib_core.config.rib_config import RibConfig
from rib_core.config.stage_configs import RefineConfig

PROCESS_CHUNK = "rib.process_chunk"
FAN_OUT = "rib.fan_out"  # sends a large job's chunks from a worker, so that a submit answers at once
FAN_OUT_INLINE = 64      # chunks a request sends itself; the rest are sent by FAN_OUT


class ChunkPayload(BaseModel):
    """Some images of one job, with the job's RIB and refinement settings (``rib.process_chunk``)."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    items: list[JobItem]
    rib: RibConfig
    refine: RefineConfig = Field(default_factory=RefineConfig)


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
        task_routes={PROCESS_CHUNK: {"queue": settings.image_queue},
                     FAN_OUT: {"queue": settings.image_queue},
                     TRAINING_JOB: {"queue": settings.training_queue},
                     PIPELINE_MAPS: {"queue": settings.image_queue},
                     PIPELINE_STAGE: {"queue": settings.training_queue}},
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_track_started=True,
        result_expires=settings.job_ttl_s,
    )
    return app


class TaskQueue:
    """Sends tasks by name: an image job's chunks, and the units of pipeline and training jobs."""

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        self.settings = settings
        self.app = app or make_celery(settings)

    def send_chunks(self, job_id: str, items: Sequence[JobItem], rib: RibConfig | dict[str, Any],
                    refine: RefineConfig | dict[str, Any] | None = None) -> None:
        """Queue a job's images in chunks of ``RIB_CHUNK_SIZE`` on the image queue."""
        size = self.settings.chunk_size
        for start in range(0, len(items), size):
            payload = ChunkPayload.model_validate({"job_id": job_id, "items": list(items[start:start + size]),
                                                   "rib": rib, "refine": refine or {}})
            self.app.send_task(PROCESS_CHUNK, args=[payload.model_dump(mode="json")],
                               queue=self.settings.image_queue, task_id=f"{job_id}-{uuid.uuid4().hex[:8]}")

    def send_job(self, job_id: str, items: Sequence[JobItem], rib: RibConfig | dict[str, Any],
                 refine: RefineConfig | dict[str, Any] | None = None) -> None:
        """Queue a recorded job: its first :data:`FAN_OUT_INLINE` chunks now, the rest from a
        :data:`FAN_OUT` task (reading the job's images from its record), so that the caller's time
        does not grow with the job."""
        inline = FAN_OUT_INLINE * self.settings.chunk_size
        self.send_chunks(job_id, items[:inline], rib, refine)
        if len(items) > inline:
            self.send_fan_out(job_id, inline)

    def send_fan_out(self, job_id: str, start: int = 0) -> None:
        """Queue the job's images from position ``start`` on (those not done yet), from a worker."""
        self.app.send_task(FAN_OUT, args=[job_id, start], queue=self.settings.image_queue,
                           task_id=f"{job_id}-fan-out-{uuid.uuid4().hex[:8]}")

    def send_pipeline(self, job_id: str, sends: Sequence[Send]) -> None:
        """Send the units :meth:`contract.pipelines.PipelineStore.advance` decided on (a pipeline's or
        a training job's): a stage on its queue (``STAGE``), or a chunk of maps on the image queue."""
        for send in sends:
            stage = STAGE[send.stage]
            queue = self.settings.training_queue if stage.queue == "training" else self.settings.image_queue
            args = [job_id, send.stage] if send.chunk is None else [job_id, send.chunk]
            self.app.send_task(stage.task, args=args, queue=queue,
                               task_id=f"{job_id}-{send.unit}-{uuid.uuid4().hex[:8]}")
