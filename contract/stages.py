"""The stage registry (every stage a staged job runs, once, with its task, queue and folders) and
what a pipeline job runs (:class:`PipelineSpec`).

A pipeline job runs the paper's chain (classifier, maps, refine, optionally DeepLab); an offline
training job is a job of one stage (``training``); an image job (an upload, a bulk job) is a job
of one stage (``images``) run in chunks of images, as the pipeline's maps are. All three are
recorded and advanced by the same store (:class:`contract.pipelines.PipelineStore`); the worker's
runners, the specs' stage lists, the API's answers and the demo (rib_core.jobs.stages's functions,
same folders) follow this list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rib_core.config.network_configs import ClassifierTrainConfig, DeepLabTrainConfig
from rib_core.config.rib_config import RibConfig
from rib_core.config.stage_configs import RefineConfig

PIPELINE_STAGE = "rib.pipeline_stage"  # a training stage of a pipeline job (training queue)
PIPELINE_MAPS = "rib.pipeline_maps"    # a chunk of RIB maps (image queue)
TRAINING_JOB = "rib.training_job"      # the one stage of an offline training job (training queue)
PROCESS_CHUNK = "rib.process_chunk"    # a chunk of an image job's images (image queue)

Stage = Literal["classifier", "maps", "refine", "deeplab", "training", "images"]
FINISHED = ("done", "skipped", "failed", "cancelled")  # a stage's terminal states


@dataclass(frozen=True)
class StageDef:
    """One stage: its task and queue, the directories of the job's folder it writes, whether a job
    may leave it out, whether it runs as chunks of images (one message per chunk), and the kind of
    job it belongs to."""

    name: Stage
    task: str
    queue: Literal["training", "images"]
    folders: tuple[str, ...]
    optional: bool = False
    chunked: bool = False
    job: Literal["pipeline", "training", "image"] = "pipeline"


STAGES: tuple[StageDef, ...] = (
    StageDef("classifier", PIPELINE_STAGE, "training", ("classifier",)),
    StageDef("maps", PIPELINE_MAPS, "images", ("maps",), chunked=True),
    StageDef("refine", PIPELINE_STAGE, "training", ("refined",)),
    StageDef("deeplab", PIPELINE_STAGE, "training", ("deeplab",), optional=True),
    StageDef("training", TRAINING_JOB, "training", (), job="training"),
    StageDef("images", PROCESS_CHUNK, "images", ("images",), chunked=True, job="image"),
)
STAGE = {s.name: s for s in STAGES}


def chunked_stage(stages: list[str]) -> str | None:
    """The job's stage that runs in chunks (maps, images), if it has one."""
    return next((s for s in stages if STAGE[s].chunked), None)  # type: ignore[index]


def chunk_stage(task: str) -> Stage:
    """The chunked stage whose chunks ``task`` runs (each chunk task runs one stage's)."""
    return next(s.name for s in STAGES if s.chunked and s.task == task)


@dataclass(frozen=True)
class Send:
    """A message :meth:`contract.pipelines.PipelineStore.advance` decided to send: a stage, or chunk
    ``chunk`` of a chunked stage (maps, images)."""

    stage: Stage
    chunk: int | None = None

    @property
    def unit(self) -> str:
        return self.stage if self.chunk is None else f"{self.stage}-{self.chunk}"


class PipelineSpec(BaseModel):
    """What a pipeline job runs: its frozen data set, an optional classifier to start from, and each
    stage's settings (the objects ``rib demo`` / ``rib refine`` / ``rib deeplab`` read)."""

    model_config = ConfigDict(extra="forbid")

    manifest: str = Field(description="the job's frozen copy of the data set's manifest (in its own prefix)")
    source_manifest: str = Field("", description="the manifest the user gave, as it was at submit")
    manifest_sha256: str = Field("", description="digest of the frozen manifest, checked on every read")
    val_manifest_sha256: str = Field("", description="digest of the frozen validation manifest, if any")
    classifier_uri: str | None = Field(None, description="a trained classifier: the classifier stage is skipped")
    val_manifest: str | None = Field(None, description="frozen labelled manifest the classifier is scored on "
                                                       "every epoch; default: the data set itself")
    classifier: ClassifierTrainConfig = Field(default_factory=ClassifierTrainConfig)
    rib: RibConfig = Field(default_factory=RibConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)
    deeplab: DeepLabTrainConfig | None = Field(None, description="set: train DeepLab on the pseudo-masks, then "
                                                                 "evaluate and predict with it")
    image_ids: list[str] = Field(description="the manifest's image ids, in order")
    chunks: list[list[str]] = Field(description="the image ids of each RIB-map chunk")
    owner: str = Field("", description="digest of the API key that made the job (contract.stores.owner_of)")
    callback_url: str | None = Field(None, description="POSTed the job's final state (webhooks)")

    @property
    def total(self) -> int:
        return len(self.image_ids)

    def stages(self) -> list[Stage]:
        return [s.name for s in STAGES if s.job == "pipeline" and (not s.optional or self.deeplab is not None)]

    def skipped(self) -> list[Stage]:
        """Stages the job has but does not run: the classifier when one is given."""
        return ["classifier"] if self.classifier_uri else []
