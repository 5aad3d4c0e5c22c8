"""Request and response bodies of the API, so that OpenAPI (``/docs``) shows every answer's shape.

The request models carry the same settings objects the offline tools use (``RibConfig`` and
``RefineConfig`` fields are validated against them in :mod:`service.validation`; a training job is
the task contract's :class:`~contract.tasks.TrainingJobRequest`).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field

from contract.tasks import TrainingJobRequest

__all__ = ["TrainingJobRequest"]

MAX_OFFSET = 2**62  # results paging: Redis list indexes are 64-bit
# An export's images: COCO's images/ and VOC's JPEGImages/ (every image read into the zip) or not.
ExportImages = Annotated[bool, Query(description="put the images in the archive (COCO images/, VOC JPEGImages/); "
                                                 "false: the masks and annotations only")]


class JobRequest(BaseModel):
    """A bulk job: a manifest (``s3://...`` JSONL, the rib-manifest format) or an inline list of records."""

    model_config = ConfigDict(extra="forbid")

    manifest_uri: str | None = Field(None, description="s3:// URI of a JSONL manifest; relative paths resolve "
                                                       "against its folder")
    images: list[Any] | None = Field(None, description='inline records: {"id", "image" (s3:// URI), "labels"}')
    rib: dict[str, Any] = Field(default_factory=dict, description="RIB parameters overriding the defaults "
                                                                  "(rib_core.config.rib_config.RibConfig)")
    refine: dict[str, Any] = Field(default_factory=dict, description="refinement settings overriding the defaults "
                                                                     "(rib_core.config.stage_configs.RefineConfig)")
    callback_url: str | None = Field(None, description="URL the job's final state is POSTed to once, signed "
                                                       "(docs/SERVICE.md, Webhooks)")


# ----------------------------------------------------------------------------- health


class Health(BaseModel):
    status: str = Field(description='"ok" while the process is up')


class ClassifierInfo(BaseModel):
    """The classifier the workers serve, as a worker recorded it at start-up."""

    uri: str | None = Field(description="RIB_CLASSIFIER_URI")
    val_map: float | None = Field(None, description="validation mAP recorded in the checkpoint (None: not "
                                                    "recorded, or no worker has read this checkpoint yet)")
    val_manifest: str | None = None
    warning: str | None = Field(None, description="set when the recorded mAP is too low for useful maps")
    recorded_at: float | None = Field(None, description="when a worker read it (Unix time)")


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, str] = Field(description='"ok", or why the part is not usable ("failing" without an API key)')
    classifier: ClassifierInfo | None = Field(None, description="shown with an API key")


# ----------------------------------------------------------------------------- jobs


class Links(BaseModel):
    status: str
    results: str | None = None


class JobAccepted(BaseModel):
    """A queued job: poll its status link."""

    job_id: str
    state: str
    image_id: str | None = Field(None, description="uploads: the image's id")
    total: int | None = Field(None, description="bulk jobs: the number of images")
    links: Links


class Counts(BaseModel):
    queued: int
    running: int
    done: int
    failed: int
    skipped: int


class ImageFailure(BaseModel):
    id: str
    error: str


class Timing(BaseModel):
    created_at: float
    started_at: float | None
    finished_at: float | None
    elapsed_s: float
    mean_image_s: float | None = Field(description="worker seconds per finished image")


class Progress(BaseModel):
    """How fast the job goes, from its own counters: None until its first image finishes."""

    images_per_minute: float | None = Field(description="images finished (done or failed) per minute since the "
                                                        "first started")
    eta_s: float | None = Field(description="seconds until the remaining images are done at that rate")
    remaining: int = Field(description="images queued or running")


class JobStatus(BaseModel):
    job_id: str
    kind: str
    state: str = Field(description="queued, running, cancelling, done, failed or cancelled")
    total: int
    counts: Counts
    errors: list[ImageFailure] = Field(description="a sample of per-image errors (the results list them all)")
    errors_truncated: bool
    timing: Timing
    progress: Progress
    rib: dict[str, Any]
    refine: dict[str, Any]


class Link(BaseModel):
    key: str = Field(description="storage key")
    uri: str
    url: str = Field(description="presigned (S3) or file URL")


class ExportLink(Link):
    """A job's export, written to storage as one zip archive."""

    format: str = Field(description="coco, labelstudio or voc")
    images: int = Field(description="finished images in the export")


class ImageResult(BaseModel):
    id: str
    status: str
    labels: list[str]
    error: str | None
    attempts: int
    seconds: float | None
    artifacts: dict[str, Link] = Field(description="every file of the image, by name")
    map: Link | None = Field(None, description="the localization map M (npz)")
    mask: Link | None = Field(None, description="the final pseudo-mask (IRN's, else seed + CRF's)")
    overlay: Link | None = Field(None, description="the final pseudo-mask over the image")


class ResultsPage(BaseModel):
    job_id: str
    offset: int
    limit: int
    total: int
    next_offset: int | None
    items: list[ImageResult]


class FinishedUpload(JobStatus):
    """An upload that finished within ``wait``: its status and its result."""

    results: ResultsPage


# ----------------------------------------------------------------------------- training jobs


class TrainingAccepted(BaseModel):
    job_id: str
    state: str
    links: Links


class TrainingStatus(BaseModel):
    job_id: str
    state: str = Field(description="queued, running, done, failed or cancelled")
    spec: dict[str, Any]
    created_at: float
    result: Any = Field(None, description="done: what the job returned (checkpoint, scores)")
    error: str | None = Field(None, description="failed: why")


# ----------------------------------------------------------------------------- pipeline jobs


class PipelineRequest(BaseModel):
    """A data set through every stage: classifier, RIB maps, refinement (IRN), optionally DeepLab."""

    model_config = ConfigDict(extra="forbid")

    manifest_uri: str = Field(description="s3:// URI of the data set's JSONL manifest (its header names the "
                                          "classes; masks, if any, are used to score every stage)")
    classifier_uri: str | None = Field(None, description="start from this classifier checkpoint instead of "
                                                         "training one")
    val_manifest_uri: str | None = Field(None, description="labelled manifest the classifier is scored on each "
                                                           "epoch (default: the data set)")
    classifier: dict[str, Any] = Field(default_factory=dict, description="classifier training "
                                       "(rib_core.config.stage_configs.ClassifierTrainConfig)")
    rib: dict[str, Any] = Field(default_factory=dict, description="RIB parameters overriding the defaults "
                                                                  "(rib_core.config.rib_config.RibConfig)")
    refine: dict[str, Any] = Field(default_factory=dict, description="refinement and IRN training overriding the "
                                   "defaults (rib_core.config.stage_configs.RefineConfig)")
    deeplab: dict[str, Any] | None = Field(None, description="set (even {}): train DeepLab on the pseudo-masks "
                                                             "(rib_core.config.stage_configs.DeepLabTrainConfig)")
    callback_url: str | None = Field(None, description="URL the job's final state is POSTed to, signed "
                                                       "(docs/SERVICE.md, Webhooks)")


class PipelineAccepted(BaseModel):
    job_id: str
    state: str
    total: int = Field(description="images in the data set")
    stages: list[str]
    links: Links


class StageStatus(BaseModel):
    state: str = Field(description="pending, running, done, skipped, failed or cancelled")
    started_at: float | None
    finished_at: float | None
    seconds: float | None = Field(description="since the stage started (until it finished)")
    progress: dict[str, Any] | None = Field(description="training: epoch of epochs; maps: chunks done")
    report: dict[str, Any] | None = Field(description="classifier: validation mAP; refine: seed, CRF, confident "
                                                      "label and mask scores (with ground truth), IRN loss; "
                                                      "deeplab: mIoU")
    error: str | None


class PipelineStatus(BaseModel):
    job_id: str
    state: str = Field(description="queued, running, cancelling, done, failed or cancelled")
    total: int
    created_at: float
    cancelled: bool
    stages: dict[str, StageStatus]


class PipelineImage(BaseModel):
    id: str
    files: dict[str, Link] = Field(description="map, crf_mask, mask (the final one: IRN's), overlay, "
                                               "confident_labels, retrain_labels: those written so far")


class PipelineResults(BaseModel):
    job_id: str
    offset: int
    limit: int
    total: int
    next_offset: int | None
    items: list[PipelineImage]
