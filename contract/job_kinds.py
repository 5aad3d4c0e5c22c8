"""The kinds of staged job one store records (:class:`contract.pipelines.PipelineStore`): pipeline
jobs, training jobs and image jobs, each with its Redis namespace, its folder in storage and its
signed spec."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from contract.job_requests import ImageJobSpec
from contract.records import Records
from contract.stages import PipelineSpec, Stage
from contract.training import TrainingSpec
from rib_core.io.artifacts import PIPELINE_SPEC, REQUEST, job_prefix, pipeline_key, training_key


class JobPlan(Protocol):
    """What the store reads of a job's spec (:class:`PipelineSpec`, :class:`TrainingSpec`,
    :class:`ImageJobSpec`)."""

    owner: str
    callback_url: str | None

    @property
    def chunks(self) -> list[list[str]]: ...

    @property
    def total(self) -> int: ...

    def stages(self) -> list[Stage]: ...

    def skipped(self) -> list[Stage]: ...


@dataclass(frozen=True)
class JobKind:
    """A kind of staged job: its Redis namespace (``prefix``: ``<prefix>:<id>``) and the reaper's set
    of its open jobs, its folder in storage (``folder(job_id, relative)``: the stage reports, the
    cancel marker), its signed spec there (``record``, read with ``parse``), and what its status
    shows of the request (``shown``). ``per_image``: the job keeps each image's state (done, failed
    with its error, skipped) and its status counts images (an image job)."""

    name: Literal["pipeline", "training", "image"]
    prefix: str
    active_key: str
    folder: Callable[[str, str], str]
    record: str
    parse: Callable[[dict[str, Any], Records], JobPlan]
    shown: Callable[[Any], dict[str, Any]]
    per_image: bool = False


PIPELINE = JobKind("pipeline", "rib:pipeline", "rib:pipelines:active", pipeline_key, PIPELINE_SPEC,
                   lambda record, _: PipelineSpec.model_validate(record), lambda spec: {})
TRAINING = JobKind("training", "rib:training", "rib:training-jobs:active", training_key, "training.json",
                   lambda record, _: TrainingSpec.model_validate(record["payload"]), lambda spec: spec.request)
IMAGE = JobKind("image", "rib:job", "rib:jobs:active", lambda job_id, relative: job_prefix(job_id) + relative,
                REQUEST, ImageJobSpec.from_request, lambda spec: {}, per_image=True)
