"""Reading what a request names: a manifest, its size checked before it is downloaded, and a data
set's manifest read, checked line by line and made into the copy a job freezes at submit."""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError
from fastapi import HTTPException

from contract.settings import Settings
from rib_core.data.datasets import Manifest
from rib_core.io.storage import parent_uri, read_bytes, uri_size
from service.validation import InputError, Locations, dataset_manifest


def read_manifest(uri: str, s: Settings, locations: Locations) -> str:
    """The manifest's text, its location and size checked before it is downloaded."""
    if err := locations(uri):
        raise InputError(422, f"manifest_uri: {err}")
    try:
        size = uri_size(uri)
        if size > s.max_manifest_bytes:
            raise InputError(422, f"the manifest at {uri} is {size} bytes; the limit is {s.max_manifest_bytes} "
                                  "(RIB_MAX_MANIFEST_BYTES): split the job")
        return read_bytes(uri).decode("utf-8")
    except FileNotFoundError as e:
        raise InputError(422, f"no manifest at {uri}") from e
    except UnicodeDecodeError as e:
        raise InputError(422, f"the manifest at {uri} is not UTF-8 text") from e
    except ClientError as e:
        raise InputError(422, f"cannot read the manifest at {uri}: {e}") from e
    except BotoCoreError as e:
        raise HTTPException(503, f"the object store is unreachable: {e}") from e


def frozen_manifest(uri: str, s: Settings, locations: Locations) -> Manifest:
    """A data set's manifest a request names, read and checked line by line, every location
    absolute: the copy a pipeline or training job keeps and reads (later edits change nothing)."""
    return dataset_manifest(read_manifest(uri, s, locations), parent_uri(uri), locations, s.max_job_images)
