"""The API in-process for tests: ``create_app`` under Starlette's TestClient, on a private
redis-server (jobs and broker) and moto's S3 server (results, inputs, the companion manifest).

No worker runs: what these tests see are the API's own decisions. Parts are swapped through
``app.dependency_overrides`` (:meth:`Api.override`), as a deployment would never do.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from contract.settings import Settings
from service.app import create_app
from tests.service_stack import moto_s3, redis_server, s3

BUCKET = "rib"
COMPANIONS = f"s3://{BUCKET}/companions/manifest.jsonl"


@dataclass
class Api:
    client: TestClient
    s3: Any
    endpoint: str
    redis_url: str
    settings: Settings
    key: str

    def post(self, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        return self.client.post(path, headers={"X-API-Key": key or self.key}, **kwargs)

    def get(self, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, headers={"X-API-Key": key or self.key}, **kwargs)

    def delete(self, path: str, key: str | None = None) -> httpx.Response:
        return self.client.delete(path, headers={"X-API-Key": key or self.key})

    @contextmanager
    def override(self, dependency: Callable[..., Any], value: Any) -> Iterator[None]:
        """Answer ``dependency`` with ``value`` inside the block."""
        overrides = self.client.app.dependency_overrides  # type: ignore[attr-defined]
        overrides[dependency] = lambda: value
        try:
            yield
        finally:
            overrides.pop(dependency, None)

    def authed(self) -> TestClient:
        """Another client of the same app that sends the API key on every request."""
        return TestClient(self.client.app, headers={"X-API-Key": self.key}, raise_server_exceptions=False)

    def objects(self, prefix: str) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@contextmanager
def inprocess_api(workdir: Path, classes: Sequence[str], keys: Sequence[str], client_key: str | None = None,
                  **settings: Any) -> Iterator[Api]:
    """The API with ``classes`` as its model's classes (a companion manifest header on S3), ``keys``
    as its API keys (``client_key``, by default the first, is the one :class:`Api` sends), results in
    ``s3://rib/results``; ``settings`` override the rest."""
    with redis_server(workdir) as redis_url, moto_s3() as endpoint, pytest.MonkeyPatch.context() as mp:
        client = s3(endpoint)
        client.create_bucket(Bucket=BUCKET)
        header = json.dumps({"format": "rib-manifest", "version": 1, "classes": list(classes)})
        record = json.dumps({"id": "c1", "image": "c1.png", "labels": [classes[0]]})
        client.put_object(Bucket=BUCKET, Key=COMPANIONS.split("/", 3)[3], Body=f"{header}\n{record}\n".encode())
        for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            mp.setenv(name, value)
        config = Settings(**{"broker_url": f"{redis_url}/0", "result_backend": f"{redis_url}/1",
                             "storage_uri": f"s3://{BUCKET}/results", "s3_endpoint_url": endpoint,
                             "api_keys": list(keys), "companion_manifest_uri": COMPANIONS, **settings})
        with TestClient(create_app(config), raise_server_exceptions=False) as tc:
            yield Api(tc, client, endpoint, redis_url, config, client_key or keys[0])
