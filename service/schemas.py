"""Response bodies of the API, each with an example, so that OpenAPI
(``/docs``) shows every answer's shape; the request bodies are :mod:`service.bodies`,
the error body :mod:`service.errors`."""

from __future__ import annotations

from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field

MAX_OFFSET = 2**62  # results paging: Redis list indexes are 64-bit
# An export's images: COCO's images/ and VOC's JPEGImages/ (every image read into the zip) or not.
ExportImages = Annotated[bool, Query(description="put the images in the archive (COCO images/, VOC JPEGImages/); "
                                                 "false: the masks and annotations only")]
JOB_ID = "3f2a9c0e7b1d4e5f8a6b2c1d0e9f8a7b"  # what a job id looks like, in the examples
T0 = 1764950400.0  # a Unix time, in the examples


def example(value: dict[str, Any], **config: Any) -> ConfigDict:
    """A model's config whose JSON schema shows ``value`` as the example."""
    return ConfigDict(json_schema_extra={"examples": [value]}, **config)


def example_of(model: type[BaseModel]) -> Any:
    """The example ``model``'s schema shows (:func:`example`), for the examples of models holding it."""
    return model.model_config["json_schema_extra"]["examples"][0]  # type: ignore[index]


Item = TypeVar("Item", bound=BaseModel)


class Page(BaseModel, Generic[Item]):
    """One page of a job's per-image results; ``next_offset`` is null on the last page."""

    job_id: str
    offset: int
    limit: int
    total: int
    next_offset: int | None
    items: list[Item]


# ----------------------------------------------------------------------------- health


class Health(BaseModel):
    model_config = example({"status": "ok"})

    status: str = Field(description='"ok" while the process is up')


class ClassifierInfo(BaseModel):
    """The classifier the workers serve, as a worker recorded it at start-up."""

    model_config = example({"uri": "s3://models/classifier.pth", "val_map": 0.91, "warning": None,
                            "val_manifest": "s3://data/voc/val.jsonl", "recorded_at": T0})

    uri: str | None = Field(description="RIB_CLASSIFIER_URI")
    val_map: float | None = Field(None, description="validation mAP recorded in the checkpoint (None: not "
                                                    "recorded, or no worker has read this checkpoint yet)")
    val_manifest: str | None = None
    warning: str | None = Field(None, description="set when the recorded mAP is too low for useful maps")
    recorded_at: float | None = Field(None, description="when a worker read it (Unix time)")


class Readiness(BaseModel):
    model_config = example({"ready": True, "checks": {"redis": "ok", "broker": "ok", "storage": "ok",
                                                      "classifier_uri": "ok", "companion_manifest_uri": "ok"},
                            "classifier": example_of(ClassifierInfo)})

    ready: bool
    checks: dict[str, str] = Field(description='"ok", or why the part is not usable ("failing" without an API key)')
    classifier: ClassifierInfo | None = Field(None, description="shown with an API key")


# ----------------------------------------------------------------------------- jobs


class Links(BaseModel):
    model_config = example({"status": f"/v1/jobs/{JOB_ID}", "results": f"/v1/jobs/{JOB_ID}/results"})

    status: str
    results: str | None = None


class JobAccepted(BaseModel):
    """A queued job: poll its status link."""

    model_config = example({"job_id": JOB_ID, "state": "queued", "image_id": None, "total": 120,
                            "links": example_of(Links)})

    job_id: str
    state: str
    image_id: str | None = Field(None, description="uploads: the image's id")
    total: int | None = Field(None, description="bulk jobs: the number of images")
    links: Links


class Counts(BaseModel):
    model_config = example({"queued": 80, "running": 4, "done": 35, "failed": 1, "skipped": 0})

    queued: int
    running: int
    done: int
    failed: int
    skipped: int


class ImageFailure(BaseModel):
    model_config = example({"id": "cat_007", "error": "ImageError: not a readable image"})

    id: str
    error: str


class Timing(BaseModel):
    model_config = example({"created_at": T0, "started_at": T0 + 2, "finished_at": None,
                                      "elapsed_s": 95.0, "mean_image_s": 2.4})

    created_at: float
    started_at: float | None
    finished_at: float | None
    elapsed_s: float
    mean_image_s: float | None = Field(description="worker seconds per finished image")


class Progress(BaseModel):
    """How fast the job goes, from its own counters: None until its first image finishes."""

    model_config = example({"images_per_minute": 24.0, "eta_s": 210.0, "remaining": 84})

    images_per_minute: float | None = Field(description="images finished (done or failed) per minute since the "
                                                        "first started")
    eta_s: float | None = Field(description="seconds until the remaining images are done at that rate")
    remaining: int = Field(description="images queued or running")


class JobStatus(BaseModel):
    model_config = example({
        "job_id": JOB_ID, "kind": "bulk", "state": "running", "total": 120, "counts": example_of(Counts),
        "errors": [example_of(ImageFailure)], "errors_truncated": False, "timing": example_of(Timing),
        "progress": example_of(Progress), "rib": {"preset": "voc", "iterations": 10},
        "refine": {"preset": "voc", "use_irn": True}})

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
    model_config = example({"key": f"jobs/{JOB_ID}/images/cat_001/mask.png",
                                    "uri": f"s3://results/jobs/{JOB_ID}/images/cat_001/mask.png",
                                    "url": "https://s3.example.org/results/jobs/...?X-Amz-Signature=..."})

    key: str = Field(description="storage key")
    uri: str
    url: str = Field(description="presigned (S3) or file URL")


class ExportLink(Link):
    """A job's export, written to storage as one zip archive."""

    model_config = example({"key": f"jobs/{JOB_ID}/export-coco.zip", "uri": f"s3://results/jobs/{JOB_ID}/export-coco.zip",
                            "url": "https://s3.example.org/results/jobs/...?X-Amz-Signature=...", "format": "coco",
                            "images": 35})

    format: str = Field(description="coco, labelstudio or voc")
    images: int = Field(description="finished images in the export")


class ImageResult(BaseModel):
    model_config = example({"id": "cat_001", "status": "done", "labels": ["cat"], "error": None, "attempts": 1,
                            "seconds": 2.3, "artifacts": {"mask": example_of(Link)}, "map": None,
                            "mask": example_of(Link), "overlay": None})

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


class ResultsPage(Page[ImageResult]):
    model_config = example({"job_id": JOB_ID, "offset": 0, "limit": 100, "total": 120, "next_offset": 100,
                            "items": [example_of(ImageResult)]})


class FinishedUpload(JobStatus):
    """An upload that finished within ``wait``: its status and its result."""

    model_config = example({**example_of(JobStatus), "kind": "upload", "state": "done", "total": 1,
                            "results": example_of(ResultsPage)})

    results: ResultsPage


# ----------------------------------------------------------------------------- training jobs


class TrainingAccepted(BaseModel):
    model_config = example({"job_id": JOB_ID, "state": "queued", "links": {"status": f"/v1/training-jobs/{JOB_ID}"}})

    job_id: str
    state: str
    links: Links


class TrainingStatus(BaseModel):
    model_config = example({"job_id": JOB_ID, "state": "running", "spec": {"kind": "train",
                            "manifest": "s3://data/voc/pseudo.jsonl"}, "created_at": T0, "result": None, "error": None})

    job_id: str
    state: str = Field(description="queued, running, done, failed or cancelled")
    spec: dict[str, Any]
    created_at: float
    result: Any = Field(None, description="done: what the job returned (checkpoint, scores)")
    error: str | None = Field(None, description="failed: why")


# ----------------------------------------------------------------------------- pipeline jobs


class PipelineAccepted(BaseModel):
    model_config = example({"job_id": JOB_ID, "state": "queued", "total": 1464,
                            "stages": ["classifier", "maps", "refine", "deeplab"],
                            "links": {"status": f"/v1/pipelines/{JOB_ID}",
                                      "results": f"/v1/pipelines/{JOB_ID}/results"}})

    job_id: str
    state: str
    total: int = Field(description="images in the data set")
    stages: list[str]
    links: Links


class StageStatus(BaseModel):
    model_config = example({"state": "running", "started_at": T0, "finished_at": None, "seconds": 340.0,
                                     "progress": {"epoch": 2, "epochs": 5}, "report": None, "error": None})

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
    model_config = example({"job_id": JOB_ID, "state": "running", "total": 1464, "created_at": T0, "cancelled": False,
                            "stages": {"classifier": example_of(StageStatus)}})

    job_id: str
    state: str = Field(description="queued, running, cancelling, done, failed or cancelled")
    total: int
    created_at: float
    cancelled: bool
    stages: dict[str, StageStatus]


class PipelineImage(BaseModel):
    model_config = example({"id": "2007_000032", "files": {"mask": example_of(Link)}})

    id: str
    files: dict[str, Link] = Field(description="map, crf_mask, mask (the final one: IRN's), overlay, "
                                               "confident_labels, retrain_labels: those written so far")


class PipelineResults(Page[PipelineImage]):
    model_config = example({"job_id": JOB_ID, "offset": 0, "limit": 100, "total": 1464, "next_offset": 100,
                            "items": [example_of(PipelineImage)]})
