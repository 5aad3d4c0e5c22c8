"""The one body of every error answer (4xx, 5xx), as each route documents it in OpenAPI."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from service.schemas import example, example_of


class ErrorItem(BaseModel):
    """One bad part of a request: a field, a manifest line or an inline record, and what is wrong."""

    model_config = example({"field": "iterations", "error": "Input should be greater than or equal to 1"})

    field: str | None = Field(None, description="the field (dotted; inside rib, refine, classifier or deeplab, "
                                                "relative to it)")
    line: int | None = Field(None, description="the manifest line, counted from 1 with the header")
    item: int | None = Field(None, description="the inline record, counted from 1")
    error: str = Field(description="what is wrong, and how to fix it")


class ErrorBody(BaseModel):
    """Every error answer of the API: what went wrong and what to do; a 422 lists each bad part."""

    model_config = example({"detail": "invalid RIB parameters: iterations: Input should be greater than or equal "
                                      "to 1", "errors": [example_of(ErrorItem)]})

    detail: str = Field(description="what went wrong and what to do")
    errors: list[ErrorItem] = Field(default_factory=list, description="each bad field, line or record (422)")


ERRORS = {
    401: "no API key, or one this server does not know",
    404: "no such job of this API key (unknown, another key's, or expired after RIB_JOB_TTL_S)",
    409: "the job's state does not allow it (already finished, nothing to export yet, its record unusable)",
    413: "the request body is over the limit (RIB_MAX_UPLOAD_BYTES)",
    422: "invalid input: `detail` says what to fix, `errors` lists each bad field, line or record",
    502: "Label Studio's file could not be downloaded, or RIB failed on a task",
    503: "the job store, the results store, the task queue or the model is out of reach: retry later",
    504: "RIB did not finish within RIB_LABEL_STUDIO_WAIT_S (the job goes on)",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses=`` for the errors it can answer, each with the error body."""
    return {code: {"model": ErrorBody, "description": ERRORS[code]} for code in codes}
