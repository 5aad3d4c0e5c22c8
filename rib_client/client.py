"""``RibClient``: submit, wait, page through results and download exports over the service's HTTP API.

Every non-2xx answer becomes an :class:`ApiError` that carries the API's own message (``detail``)
and per-line or per-item errors, so a caller sees what to fix rather than a bare status code.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO, TypeVar
from urllib.parse import unquote, urlsplit

import httpx
from pydantic import BaseModel

from rib_client.models import Accepted, ExportLink, ImageResult, JobStatus, PipelineImage, PipelineStatus
from rib_client.progress import ProgressLine

M = TypeVar("M", bound=BaseModel)
Status = JobStatus | PipelineStatus


class ApiError(Exception):
    """The API refused a request (4xx: fix the request as ``detail`` says) or failed (5xx: retry later)."""

    def __init__(self, status_code: int, method: str, path: str, detail: str, errors: list[Any]) -> None:
        self.status_code, self.method, self.path, self.detail, self.errors = status_code, method, path, detail, errors
        lines = [f"{status_code} {method} {path}: {detail}"]
        lines += [f"  {json.dumps(e) if not isinstance(e, str) else e}" for e in errors[:20]]
        if len(errors) > 20:
            lines.append(f"  ... and {len(errors) - 20} more")
        super().__init__("\n".join(lines))

    @classmethod
    def from_response(cls, r: httpx.Response) -> ApiError:
        try:
            body = r.json()
        except ValueError:
            body = None
        detail: Any = body.get("detail") if isinstance(body, dict) else None
        errors = (body.get("errors") or []) if isinstance(body, dict) else []
        if not isinstance(detail, str):  # FastAPI's own validation answer: a list of {loc, msg}
            errors = errors or (detail if isinstance(detail, list) else [])
            detail = r.reason_phrase if detail is None or isinstance(detail, list) else json.dumps(detail)
        return cls(r.status_code, r.request.method, r.request.url.path, detail or r.text[:500], errors)


class WaitTimeoutError(TimeoutError):
    """The job had not finished when :meth:`RibClient.wait` gave up; ``status`` is the last one seen."""

    def __init__(self, status: Status, seconds: float) -> None:
        self.status = status
        super().__init__(f"job {status.job_id} still {status.state} after {seconds:.0f} s")


class RibClient:
    """The service at ``base_url`` with ``api_key``. ``http``: an httpx client to send through instead
    (e.g. Starlette's TestClient on the app in-process); the key is sent on every request either way."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str = "", *, timeout: float = 60.0,
                 http: httpx.Client | None = None) -> None:
        self._own = http is None
        self._http = http if http is not None else httpx.Client(base_url=base_url, timeout=timeout)
        self._auth = {"X-API-Key": api_key}

    def close(self) -> None:
        if self._own:
            self._http.close()

    def __enter__(self) -> RibClient:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing
    def _request(self, method: str, path: str, model: type[M], **kwargs: Any) -> M:
        r = self._http.request(method, path, headers=self._auth, **kwargs)
        if r.is_error:
            raise ApiError.from_response(r)
        return model.model_validate(r.json())

    @staticmethod
    def _jobs(pipeline: bool) -> str:
        return "/v1/pipelines" if pipeline else "/v1/jobs"

    # ------------------------------------------------------------------ submitting
    def submit_upload(self, image: str | Path | bytes, labels: Sequence[str], *, image_id: str | None = None,
                      filename: str | None = None, rib: Mapping[str, Any] | None = None,
                      refine: Mapping[str, Any] | None = None) -> Accepted:
        """One image (a path or its bytes) with its class names; ``image_id`` defaults to the file's stem."""
        if isinstance(image, bytes):
            data, name = image, filename or "image"
        else:
            data, name = Path(image).read_bytes(), filename or Path(image).name
        form: dict[str, Any] = {"labels": list(labels)}
        for field, value in (("image_id", image_id), ("rib", rib), ("refine", refine)):
            if value is not None:
                form[field] = value if isinstance(value, str) else json.dumps(value)
        return self._request("POST", "/v1/images", Accepted, files={"file": (name, data)}, data=form)

    def submit_job(self, *, manifest_uri: str | None = None, images: Sequence[Mapping[str, Any]] | None = None,
                   rib: Mapping[str, Any] | None = None, refine: Mapping[str, Any] | None = None) -> Accepted:
        """A bulk job: an ``s3://`` JSONL manifest, or inline records ``{"id", "image", "labels"}``."""
        body = {"manifest_uri": manifest_uri, "images": None if images is None else list(images),
                "rib": rib, "refine": refine}
        return self._request("POST", "/v1/jobs", Accepted, json=_given(body))

    def submit_pipeline(self, manifest_uri: str, *, classifier_uri: str | None = None,
                        val_manifest_uri: str | None = None, classifier: Mapping[str, Any] | None = None,
                        rib: Mapping[str, Any] | None = None, refine: Mapping[str, Any] | None = None,
                        deeplab: Mapping[str, Any] | None = None) -> Accepted:
        """A data set through every stage (classifier, maps, refinement, DeepLab when ``deeplab`` is given)."""
        body = {"manifest_uri": manifest_uri, "classifier_uri": classifier_uri, "val_manifest_uri": val_manifest_uri,
                "classifier": classifier, "rib": rib, "refine": refine, "deeplab": deeplab}
        return self._request("POST", "/v1/pipelines", Accepted, json=_given(body))

    # ------------------------------------------------------------------ following
    def status(self, job_id: str, *, pipeline: bool = False) -> Status:
        return self._request("GET", f"{self._jobs(pipeline)}/{job_id}", PipelineStatus if pipeline else JobStatus)

    def cancel(self, job_id: str, *, pipeline: bool = False) -> Status:
        """Stop the job: images (stages) not started are skipped; running ones finish."""
        return self._request("DELETE", f"{self._jobs(pipeline)}/{job_id}", PipelineStatus if pipeline else JobStatus)

    def wait(self, job_id: str, *, pipeline: bool = False, timeout: float | None = None, interval: float = 1.0,
             progress: bool | TextIO = False) -> Status:
        """Poll until the job is done, failed or cancelled, and return that status. ``progress``: draw a
        bar with the ETA on stderr (``True``) or on this stream. :class:`WaitTimeoutError` after ``timeout`` s."""
        stream = sys.stderr if progress is True else progress or None
        line = ProgressLine(stream, f"{'pipeline' if pipeline else 'job'} {job_id[:8]}") if stream else None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status(job_id, pipeline=pipeline)
            if line:
                line.update(status)
            if status.finished:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(status, timeout or 0.0)
            time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))

    def results(self, job_id: str, *, pipeline: bool = False, page_size: int = 100,
                ) -> Iterator[ImageResult] | Iterator[PipelineImage]:
        """Every image's result, page by page (``page_size`` per request, 1000 at most)."""
        model = PipelineImage if pipeline else ImageResult
        offset: int | None = 0
        while offset is not None:
            page = self._request("GET", f"{self._jobs(pipeline)}/{job_id}/results", _Page,
                                 params={"offset": offset, "limit": page_size})
            yield from (model.model_validate(item) for item in page.items)
            offset = page.next_offset

    # ------------------------------------------------------------------ exporting
    def export(self, job_id: str, format: str, dest: str | Path, *, pipeline: bool = False,
               image_url_prefix: str | None = None) -> Path:
        """Have the service write the job's export (``coco``, ``labelstudio`` or ``voc``: one zip) and
        download it to ``dest`` (a file, or a folder to put ``<job>-<format>.zip`` in)."""
        params = _given({"format": format, "image_url_prefix": image_url_prefix})
        link = self._request("GET", f"{self._jobs(pipeline)}/{job_id}/export", ExportLink, params=params)
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / f"{job_id}-{format}.zip"
        download(link.url, dest)
        return dest


class _Page(BaseModel):
    next_offset: int | None
    items: list[dict[str, Any]]


def _given(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The fields that were set: the server's defaults apply to the rest."""
    return {k: v for k, v in fields.items() if v is not None}


def download(url: str, dest: Path) -> None:
    """A result link (a presigned ``http(s)`` URL, or a ``file://`` one for a local results folder) to
    ``dest``. The API key is not sent: the link carries its own authorisation."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    parts = urlsplit(url)
    if parts.scheme == "file":
        shutil.copyfile(unquote(parts.path), dest)
        return
    with httpx.stream("GET", url, timeout=300, follow_redirects=True) as r:
        if r.is_error:
            r.read()
            raise ApiError.from_response(r)
        with dest.open("wb") as f:
            for chunk in r.iter_bytes(1 << 20):
                f.write(chunk)
