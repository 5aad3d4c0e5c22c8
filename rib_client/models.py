"""The API's answers as the client reads them. Coded against the JSON field names (not the service's
own models, which the client must not import); unknown fields are kept (``extra="allow"``), so a
newer server's additions pass through instead of failing an older client."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

FINISHED = frozenset({"done", "failed", "cancelled"})


class Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class Accepted(Body):
    """A queued job (upload, bulk or pipeline): poll it with :meth:`RibClient.wait`."""

    job_id: str
    state: str
    image_id: str | None = None
    total: int | None = None
    stages: list[str] | None = None
    links: dict[str, str | None] = {}


class Counts(Body):
    queued: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0


class Progress(Body):
    images_per_minute: float | None = None
    eta_s: float | None = None
    remaining: int = 0


class JobStatus(Body):
    """An upload's or a bulk job's status."""

    job_id: str
    state: str
    total: int
    counts: Counts
    errors: list[dict[str, Any]] = []
    progress: Progress = Progress()

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


class StageStatus(Body):
    state: str
    seconds: float | None = None
    progress: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    error: str | None = None


class PipelineStatus(Body):
    """A pipeline job's status: one entry per stage, in order."""

    job_id: str
    state: str
    total: int
    stages: dict[str, StageStatus]

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


class Link(Body):
    key: str
    uri: str
    url: str


class ImageResult(Body):
    """One image of an upload or bulk job: its state and links to its files."""

    id: str
    status: str
    labels: list[str] = []
    error: str | None = None
    artifacts: dict[str, Link] = {}
    map: Link | None = None
    mask: Link | None = None
    overlay: Link | None = None


class PipelineImage(Body):
    """One image of a pipeline job: links to the files written so far."""

    id: str
    files: dict[str, Link] = {}


class ExportLink(Link):
    format: str
    images: int
