"""The kinds of staged job one store records (:class:`contract.pipelines.PipelineStore`): pipeline
jobs and training jobs, each with its Redis namespace, its folder in storage and its signed spec."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from contract.stages import PipelineSpec, Stage
from contract.training import TrainingSpec
from rib_core.io.artifacts import PIPELINE_SPEC, pipeline_key, training_key


class JobPlan(Protocol):
    """What the store reads of a job's spec (:class:`PipelineSpec`, :class:`TrainingSpec`)."""

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
    """A kind of staged job: its Redis namespace (``rib:<name>:<id>``) and the reaper's set of its
    open jobs, its folder in storage (``folder(job_id, relative)``: the stage reports, the cancel
    marker), its signed spec there (``record``, read with ``parse``), and what its status shows of
    the request (``shown``)."""

    name: Literal["pipeline", "training"]
    active_key: str
    folder: Callable[[str, str], str]
    record: str
    parse: Callable[[dict[str, Any]], JobPlan]
    shown: Callable[[Any], dict[str, Any]]


PIPELINE = JobKind("pipeline", "rib:pipelines:active", pipeline_key, PIPELINE_SPEC, PipelineSpec.model_validate,
                   lambda spec: {})
TRAINING = JobKind("training", "rib:training-jobs:active", training_key, "training.json",
                   lambda record: TrainingSpec.model_validate(record["payload"]), lambda spec: spec.request)
