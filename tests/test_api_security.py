"""Security and robustness of the API and the training jobs (issue 14): no unpickling of foreign files,
allowed input and output locations, tenancy, bounded validation and the shape of every error.

In-process: the FastAPI app under Starlette's TestClient, the real Redis on a private db number
(flushed here) and results in a local folder. No worker runs: these are the API's own decisions.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import torch
from fastapi.testclient import TestClient
from PIL import Image

from rib_core.checkpoints import CheckpointError
from rib_core.datasets import Manifest, ManifestRecord
from rib_core.storage import open_storage
from rib_core.train_deeplab import DeepLabTrainConfig, train_deeplab
from service.jobs import JobStore, image_key
from tests.service_stack import free_port, moto_s3, redis_server, s3


class _RunsCode:
    """Pickles as a call to ``open(marker, "w")``: loading it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (str(self.marker), "w")


def test_planted_training_state_is_refused_without_running_its_code(tmp_path: Path) -> None:
    """A checkpoint under a training output's checkpoints/ is read as tensors and plain data only."""
    marker = tmp_path / "code-ran"
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"config": {}, "model": {}, "step": 1, "payload": _RunsCode(marker)},
               out / "checkpoints" / "step_00000001.pth")
    manifest = Manifest(["a"], [ManifestRecord("x", "x.png", ("a",), "x_mask.png")], str(tmp_path))
    cfg = DeepLabTrainConfig(arch="resnet18", batch_size=1, iterations=1, msc_scales=[], retrain=False)
    with pytest.raises(CheckpointError, match=r"refusing to resume from .*step_00000001\.pth"):
        train_deeplab(manifest, out, cfg, progress=False)
    assert not marker.exists()


# ----------------------------------------------------------------------------- the API in-process

API_KEY, OTHER_KEY = "key-of-alice", "key-of-bob"
BUCKET = "rib"
CLASSES = ["cat", "dog", "bird"]


@dataclass
class Api:
    client: TestClient
    s3: Any
    endpoint: str
    redis_url: str
    settings: Any

    def post(self, path: str, key: str = API_KEY, **kwargs: Any) -> httpx.Response:
        return self.client.post(path, headers={"X-API-Key": key}, **kwargs)

    def get(self, path: str, key: str = API_KEY, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, headers={"X-API-Key": key}, **kwargs)

    def delete(self, path: str, key: str = API_KEY) -> httpx.Response:
        return self.client.delete(path, headers={"X-API-Key": key})


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """service.main's app on a private redis-server and moto's S3 server, results in s3://rib/results."""
    from service.settings import get_settings

    with (redis_server(tmp_path_factory.mktemp("redis")) as redis_url, moto_s3() as endpoint,
          pytest.MonkeyPatch.context() as mp):
        client = s3(endpoint)
        client.create_bucket(Bucket=BUCKET)
        header = json.dumps({"format": "rib-manifest", "version": 1, "classes": CLASSES})
        client.put_object(Bucket=BUCKET, Key="companions/manifest.jsonl",
                          Body=f'{header}\n{{"id": "c1", "image": "c1.png", "labels": ["cat"]}}\n'.encode())
        for name, value in {
            "RIB_BROKER_URL": f"{redis_url}/0", "RIB_RESULT_BACKEND": f"{redis_url}/1",
            "RIB_STORAGE_URI": f"s3://{BUCKET}/results", "RIB_S3_ENDPOINT_URL": endpoint,
            "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "RIB_API_KEYS": f"{API_KEY},{OTHER_KEY}",
            "RIB_COMPANION_MANIFEST_URI": f"s3://{BUCKET}/companions/manifest.jsonl",
            "RIB_MAX_MANIFEST_BYTES": "20000", "RIB_MAX_MANIFEST_LINES": "100",
        }.items():
            mp.setenv(name, value)
        get_settings.cache_clear()
        from service import main
        from worker.celery_app import app as celery_app

        main.service.cache_clear()
        # The Celery app read its broker at import: point it at the private server, never the shared one.
        celery_app.conf.update(broker_url=f"{redis_url}/0", result_backend=f"{redis_url}/1")
        try:
            with TestClient(main.app, raise_server_exceptions=False) as tc:
                yield Api(tc, client, endpoint, redis_url, main.service().settings)
        finally:
            main.service.cache_clear()
            get_settings.cache_clear()


def test_default_locations_are_the_configured_bucket_and_storage(tmp_path: Path) -> None:
    from service.settings import Settings

    s3_settings = Settings(storage_uri="s3://data/results")
    assert s3_settings.input_prefixes == ["s3://data/"] and s3_settings.output_prefixes == ["s3://data/results/"]
    local = Settings(storage_uri=str(tmp_path / "results"))
    assert local.input_prefixes == [] and local.output_prefixes == [f"{tmp_path}/results/"]
    given = Settings(storage_uri="s3://data/results", input_prefixes="s3://a/,s3://b/x/", output_prefixes="s3://c/")
    assert given.input_prefixes == ["s3://a/", "s3://b/x/"] and given.output_prefixes == ["s3://c/"]


def test_training_locations_are_checked_against_their_own_allow_lists(api: Api) -> None:
    base = {"kind": "train", "manifest": f"s3://{BUCKET}/data/m.jsonl", "output": f"s3://{BUCKET}/results/run1",
            "config": {"arch": "resnet18"}}
    cases = {
        "output in another bucket": ({"output": "s3://attacker/run"}, "output", "RIB_OUTPUT_PREFIXES"),
        "output beside the results": ({"output": f"s3://{BUCKET}/data/run"}, "output", "RIB_OUTPUT_PREFIXES"),
        "input in another bucket": ({"manifest": "s3://attacker/m.jsonl"}, "manifest", "RIB_INPUT_PREFIXES"),
        "checkpoint in another bucket": ({"kind": "evaluate", "checkpoint": "s3://attacker/c.pth"}, "checkpoint",
                                         "RIB_INPUT_PREFIXES"),
        "worker-local init weights": ({"config": {"arch": "resnet18", "init_weights": "/root/.ssh/id_rsa"}},
                                      "config.init_weights", "RIB_ALLOW_LOCAL_INIT_WEIGHTS"),
    }
    for name, (change, field, setting) in cases.items():
        r = api.post("/v1/training-jobs", json={**base, **change})
        assert r.status_code == 422, (name, r.text)
        errors = r.json()["errors"]
        assert [e["field"] for e in errors] == [field] and setting in errors[0]["error"], (name, errors)
    r = api.post("/v1/training-jobs", json=base)
    assert r.status_code == 202, r.text
    # Inputs of image jobs too: the configured bucket only, not every bucket.
    r = api.post("/v1/jobs", json={"images": [{"id": "a", "image": "s3://attacker/a.png", "labels": ["cat"]}]})
    assert r.status_code == 422 and "RIB_INPUT_PREFIXES" in r.json()["errors"][0]["error"], r.text


def png(size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((*size, 3), 120, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def upload(api: Api, key: str = API_KEY, **params: Any) -> httpx.Response:
    return api.post("/v1/images", key, params=params, files={"file": ("scene.png", png(), "image/png")},
                    data={"labels": "cat"})


def test_jobs_belong_to_the_key_that_made_them(api: Api) -> None:
    r = upload(api)
    assert r.status_code == 202, r.text
    image_job = r.json()["job_id"]
    r = api.post("/v1/jobs", json={"images": [{"id": "a", "image": f"s3://{BUCKET}/a.png", "labels": ["cat"]}]})
    assert r.status_code == 202, r.text
    bulk_job = r.json()["job_id"]
    r = api.post("/v1/training-jobs", json={"kind": "train", "manifest": f"s3://{BUCKET}/data/m.jsonl",
                                            "output": f"s3://{BUCKET}/results/t", "config": {"arch": "resnet18"}})
    assert r.status_code == 202, r.text
    training_job = r.json()["job_id"]
    for job_id in (image_job, bulk_job):
        for method, path in (("get", f"/v1/jobs/{job_id}"), ("get", f"/v1/jobs/{job_id}/results"),
                             ("delete", f"/v1/jobs/{job_id}")):
            theirs = getattr(api, method)(path, OTHER_KEY)
            assert theirs.status_code == 404 and "no job" in theirs.json()["detail"], (method, path, theirs.text)
        assert api.get(f"/v1/jobs/{job_id}").json()["state"] == "queued"  # untouched by the other key
        assert api.get(f"/v1/jobs/{job_id}/results").status_code == 200
    assert api.get(f"/v1/training-jobs/{training_job}", OTHER_KEY).status_code == 404
    assert api.get(f"/v1/training-jobs/{training_job}").json()["state"] == "queued"
    assert api.delete(f"/v1/jobs/{bulk_job}").json()["state"] == "cancelled"  # the owner can cancel
    # Redis holds the key's digest, never the key.
    r = redis.Redis.from_url(f"{api.redis_url}/0", decode_responses=True)
    stored = [r.hgetall(f"rib:job:{image_job}"), r.hgetall(f"rib:training:{training_job}")]
    assert [d["owner"] for d in stored] == [hashlib.sha256(API_KEY.encode()).hexdigest()] * 2
    assert not [k for k in r.scan_iter() if r.type(k) == "hash" and API_KEY in json.dumps(r.hgetall(k))]


def test_upload_is_stored_only_once_its_job_is_recorded(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    from service import main

    def uploads() -> list[str]:
        pages = api.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="results/jobs/")
        return [o["Key"] for page in pages for o in page.get("Contents", []) if "/uploads/" in o["Key"]]

    svc = main.service()
    before = uploads()
    monkeypatch.setattr(svc, "store", JobStore.from_url(f"redis://127.0.0.1:{free_port()}/0"))  # nothing listens
    r = upload(api)
    assert r.status_code == 503 and "job store is unavailable" in r.json()["detail"], r.text
    assert uploads() == before  # no orphan
    monkeypatch.undo()
    monkeypatch.setattr(svc, "storage", open_storage("s3://no-such-bucket/results", client=s3(api.endpoint)))
    r = upload(api)
    assert r.status_code == 503 and "results store is unreachable" in r.json()["detail"], r.text
    job_id = r.json()["detail"].split("job ")[1].split()[0]
    monkeypatch.undo()
    status = api.get(f"/v1/jobs/{job_id}").json()
    assert status["state"] == "failed" and "could not be stored" in status["errors"][0]["error"], status


@pytest.mark.parametrize("where", ["s3", "local"])
def test_listing_an_image_folder_lists_only_that_image(api: Api, tmp_path: Path, where: str) -> None:
    storage = (open_storage(f"s3://{BUCKET}/listing-{tmp_path.name}", client=s3(api.endpoint)) if where == "s3"
               else open_storage(str(tmp_path)))
    for image_id in ("d00", "d000", "d009"):
        storage.put(image_key("j" * 32, image_id, "meta.json"), b"{}")
    assert list(storage.list(image_key("j" * 32, "d00"))) == [f"jobs/{'j' * 32}/images/d00/meta.json"]
