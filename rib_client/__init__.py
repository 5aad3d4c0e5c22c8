"""A small Python client of the RIB service's HTTP API. It imports only httpx and pydantic (the
``client`` extra), nothing else of this project, so a user's machine needs neither torch nor the
service's code to run it: this folder alone is enough. ``rib-remote`` (:mod:`rib_client.cli`) is its
command line."""

from rib_client.client import ApiError, RibClient, WaitTimeoutError
from rib_client.models import (
    Accepted,
    ExportLink,
    ImageResult,
    JobStatus,
    PipelineImage,
    PipelineStatus,
)

__all__ = ["Accepted", "ApiError", "ExportLink", "ImageResult", "JobStatus", "PipelineImage", "PipelineStatus",
           "RibClient", "WaitTimeoutError"]
