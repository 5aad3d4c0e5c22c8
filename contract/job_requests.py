"""What an image job was asked, as the service keeps it: its images (:class:`JobItem`), its plan
(:class:`ImageJobSpec`: a staged job of one chunked stage, ``images``) and its signed
``request.json`` (with, for a job from a manifest, that manifest's bytes frozen beside it), from
which a job Redis lost is rebuilt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from contract.records import Records
from contract.stages import STAGES, Stage
from rib_core.data.datasets import parse_manifest
from rib_core.io.artifacts import job_manifest_key, request_key


@dataclass(frozen=True)
class JobItem:
    """One image of a job: where to read it and its class names."""

    id: str
    image: str
    labels: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "image": self.image, "labels": list(self.labels)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> JobItem:
        return cls(d["id"], d["image"], tuple(d["labels"]))


@dataclass(frozen=True)
class SubmittedManifest:
    """The manifest a bulk job's images came from, as the request named it: ``text`` validated against
    ``classes``, relative locations resolved against ``base``."""

    text: str
    base: str
    classes: tuple[str, ...]

    def items(self) -> list[JobItem]:
        manifest = parse_manifest(self.text, base=self.base, classes=self.classes)
        return [JobItem(r.id, manifest.image_uri(r), r.labels) for r in manifest.records]


@dataclass(frozen=True)
class ImageJobSpec:
    """What an image job runs (a :class:`contract.job_kinds.JobPlan`): its images, in chunks of
    ``chunk_size`` (one message each), with its RIB and refinement settings (as JSON). ``kind``:
    ``upload`` or ``bulk``."""

    kind: str
    items: Sequence[JobItem]
    rib: dict[str, Any]
    refine: dict[str, Any]
    chunk_size: int
    owner: str = ""
    callback_url: str | None = None

    @property
    def total(self) -> int:
        return len(self.items)

    @cached_property
    def chunks(self) -> list[list[str]]:
        """Each chunk's image ids, made once per spec: every chunk's count and every advance read it
        (a worker keeps the spec), and at 100k images it is 12,500 lists."""
        return [[it.id for it in self.chunk_items(n)] for n in range(-(-self.total // self.chunk_size))]

    def chunk_items(self, chunk: int) -> Sequence[JobItem]:
        return self.items[chunk * self.chunk_size:(chunk + 1) * self.chunk_size]

    def stages(self) -> list[Stage]:
        return [s.name for s in STAGES if s.job == "image"]

    def skipped(self) -> list[Stage]:
        return []

    @classmethod
    def from_request(cls, request: dict[str, Any], records: Records) -> ImageJobSpec:
        """The spec a kept ``request.json`` describes (its items read back: :func:`request_items`)."""
        return cls(request["kind"], request_items(records, request), request["rib"], request.get("refine") or {},
                   request["chunk_size"], request.get("owner", ""), request.get("callback_url"))


def save_request(records: Records, job_id: str, spec: ImageJobSpec, manifest: SubmittedManifest | None = None,
                 ) -> None:
    """Keep what a job was asked to do (and whose it is) next to its results, signed, so that a job
    Redis lost can be rebuilt (and only from a record the service wrote).

    A job from a ``manifest`` keeps that manifest's bytes frozen beside the record (its digest signed
    in it) instead of its items re-encoded: one write of bytes already in hand, which is most of what
    recording a 100,000-image job cost; :func:`request_items` reads them back either way."""
    body = {"job_id": job_id, "kind": spec.kind, "owner": spec.owner, "rib": spec.rib, "refine": spec.refine,
            "callback_url": spec.callback_url, "chunk_size": spec.chunk_size}
    if manifest is None:
        body["items"] = [it.to_json() for it in spec.items]
    else:
        key = job_manifest_key(job_id)
        body["manifest"] = {"key": key, "sha256": records.put_frozen(key, manifest.text.encode()),
                            "base": manifest.base, "classes": list(manifest.classes)}
    records.put(request_key(job_id), body)


def load_request(records: Records, job_id: str) -> dict[str, Any]:
    """The job's ``request.json`` (what :func:`save_request` kept). FileNotFoundError without one,
    UntrustedRecordError when the service did not write it."""
    return records.get(request_key(job_id))


def request_items(records: Records, request: dict[str, Any]) -> list[JobItem]:
    """A kept request's images: its items, or those of its frozen manifest (checked against the signed
    digest: UntrustedRecordError if the copy changed)."""
    if "manifest" not in request:
        return [JobItem.from_json(d) for d in request["items"]]
    frozen = request["manifest"]
    text = records.get_frozen(frozen["key"], frozen["sha256"]).decode()
    return SubmittedManifest(text, frozen["base"], tuple(frozen["classes"])).items()
