"""The API in-process (tests/api_inprocess.py): create_app under TestClient with a private redis-server and
moto's S3 server, the demo data set's classes as the model's. No worker runs: health, keys, every kind of
bad input (moved here from tests/test_service.py, which keeps the tests that need a worker), the
refinement settings a request carries, job progress and the classifier /readyz shows.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from contract.job_requests import ImageJobSpec, JobItem, load_request, save_request
from contract.job_status import progress
from contract.records import Records
from contract.worker_reports import record_classifier
from rib_core.config.rib_config import RibConfig
from rib_core.config.stage_configs import RefineConfig
from rib_core.data.demo_data import DemoDataset
from rib_core.io.storage import LocalStorage
from tests.api_inprocess import BUCKET, Api, inprocess_api
from tests.test_service import API_KEY, MAX_PIXELS, MAX_UPLOAD, SMALL_RIB

CLASSIFIER = f"s3://{BUCKET}/models/classifier.pth"


@pytest.fixture(scope="module")
def api(demo: DemoDataset, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """The service's settings of tests/test_service.py's stack; the classifier a placeholder object
    (nothing here loads it)."""
    with inprocess_api(tmp_path_factory.mktemp("redis"), demo.train.classes, ["other-key", API_KEY], API_KEY,
                       classifier_uri=CLASSIFIER, rib_defaults=SMALL_RIB, max_upload_bytes=MAX_UPLOAD,
                       max_image_pixels=MAX_PIXELS, refine_defaults={"seed_threshold": 0.2}) as api:
        api.s3.put_object(Bucket=BUCKET, Key="models/classifier.pth", Body=b"placeholder")
        yield api


def test_health_docs_metrics_and_api_keys(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert set(ready.json()["checks"]) == {"redis", "broker", "storage", "classifier_uri", "companion_manifest_uri"}
    assert api.client.get("/docs").status_code == 200
    spec = api.client.get("/openapi.json").json()
    assert {"/v1/images", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/results",
            "/v1/training-jobs"} <= set(spec["paths"])
    assert "rib_queue_length" in api.client.get("/metrics").text
    for headers, message in (({}, "missing API key"), ({"X-API-Key": "nope"}, "wrong API key")):
        for method, path in (("GET", "/v1/jobs/0123"), ("POST", "/v1/jobs"), ("POST", "/v1/images"),
                             ("DELETE", "/v1/jobs/0123"), ("GET", "/v1/training-jobs/0123")):
            r = api.client.request(method, path, headers=headers)
            assert r.status_code == 401 and message in r.json()["detail"], (method, path, r.text)
    with api.authed() as c:
        assert c.get("/v1/jobs/0123456789abcdef0123456789abcdef").status_code == 404
        # The first key of the comma-separated list works too.
        assert c.get("/v1/jobs/x", headers={"X-API-Key": "other-key"}).status_code == 404


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


BOUNDARY = "rib-test-boundary"


def streamed_form(payload: bytes) -> Iterator[bytes]:
    """A multipart upload sent in chunks without a Content-Length, as a streaming client does."""
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="labels"\r\n\r\ndigit1\r\n--{BOUNDARY}\r\n'
            f'Content-Disposition: form-data; name="file"; filename="f.png"\r\nContent-Type: image/png\r\n\r\n')
    body = head.encode() + payload + f"\r\n--{BOUNDARY}--\r\n".encode()
    for start in range(0, len(body), 65536):
        yield body[start:start + 65536]


def _job_keys(api: Api) -> int:
    return len(list(redis.Redis.from_url(f"{api.redis_url}/0").scan_iter("rib:job:*")))


def test_bad_input_gets_a_4xx_and_never_reaches_a_worker(api: Api, demo: DemoDataset) -> None:
    record = demo.val.records[0]
    good = Path(demo.val.image_uri(record)).read_bytes()
    labels = {"labels": list(record.labels)}
    bad_manifest = "\n".join([
        json.dumps({"format": "rib-manifest", "version": 1, "classes": demo.train.classes}),
        json.dumps({"id": "a", "image": "images/a.png", "labels": ["digit1"]}),
        "{not json",
        json.dumps({"id": "b", "image": "images/b.png"}),
        json.dumps({"id": "a", "image": "images/c.png", "labels": ["digit1"]}),
        json.dumps({"id": "d", "image": "images/d.png", "labels": ["cat"]}),
    ]) + "\n"
    escaping = "\n".join([
        *bad_manifest.splitlines()[:2],
        json.dumps({"id": "e", "image": "../../secrets/e.png", "labels": ["digit2"]}),
        json.dumps({"id": "f", "image": "/etc/passwd", "labels": ["digit2"]})])
    api.s3.put_object(Bucket=BUCKET, Key="inputs/bad.jsonl", Body=bad_manifest.encode())
    api.s3.put_object(Bucket=BUCKET, Key="inputs/escaping.jsonl", Body=escaping.encode())
    before = _job_keys(api)
    with api.authed() as c:
        def upload(content: bytes, data: dict[str, Any] = labels) -> httpx.Response:
            return c.post("/v1/images", files={"file": ("f.png", content, "image/png")}, data=data)

        cases = {
            "not an image": (upload(b"hello, I am text"), 422, "not a readable image"),
            "truncated": (upload(good[: len(good) // 2]), 422, "not a readable image"),
            "empty file": (upload(b""), 422, "empty"),
            "decompression bomb": (upload(png(np.zeros((1000, 1000), bool))), 422, f"the limit is {MAX_PIXELS}"),
            "oversize (header)": (upload(os.urandom(MAX_UPLOAD + 70_000)), 413, "RIB_MAX_UPLOAD_BYTES"),
            "oversize (file)": (upload(os.urandom(MAX_UPLOAD + 10)), 413, "RIB_MAX_UPLOAD_BYTES"),
            "oversize (streamed)": (c.post("/v1/images", content=streamed_form(os.urandom(MAX_UPLOAD + 70_000)),
                                           headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}),
                                    413, "RIB_MAX_UPLOAD_BYTES"),
            "unknown class": (upload(good, {"labels": ["digit1", "cat"]}), 422, "unknown class"),
            "empty labels": (upload(good, {"labels": " , "}), 422, "empty label set"),
            "escaping id": (upload(good, {**labels, "image_id": "../other-job/x"}), 422, "not a safe result key"),
            "bad rib": (upload(good, {**labels, "rib": '{"iterations": 0}'}), 422, "invalid RIB parameters"),
            "huge crop": (upload(good, {**labels, "rib": '{"crop_size": 100000}'}), 422, "less than or equal to 1024"),
            "rib not json": (upload(good, {**labels, "rib": "{iterations"}), 422, "JSON object"),
            "manifest lines": (c.post("/v1/jobs", json={"manifest_uri": f"s3://{BUCKET}/inputs/bad.jsonl"}),
                               422, "invalid manifest"),
            "manifest escaping": (c.post("/v1/jobs", json={"manifest_uri": f"s3://{BUCKET}/inputs/escaping.jsonl"}),
                                  422, "2 invalid"),
            "no manifest": (c.post("/v1/jobs", json={"manifest_uri": f"s3://{BUCKET}/inputs/none.jsonl"}),
                            422, "no manifest at"),
            "manifest elsewhere": (c.post("/v1/jobs", json={"manifest_uri": "/etc/passwd"}), 422, "outside"),
            "neither": (c.post("/v1/jobs", json={}), 422, "exactly one of"),
            "duplicate ids": (c.post("/v1/jobs", json={"images": [
                {"id": "a", "image": f"s3://{BUCKET}/a.png", "labels": ["digit1"]},
                {"id": "a", "image": f"s3://{BUCKET}/b.png", "labels": ["digit2"]}]}), 422, "1 invalid"),
            "escaping inline": (c.post("/v1/jobs", json={"images": [
                {"id": "ok", "image": f"s3://{BUCKET}/jobs/../../x.png", "labels": ["digit1"]},
                {"id": "x..y", "image": "/etc/passwd", "labels": ["digit1"]},
                {"id": "-x", "image": f"s3://{BUCKET}/x.png", "labels": ["digit1"]}]}), 422, "3 invalid"),
            "empty list": (c.post("/v1/jobs", json={"images": []}), 422, "images is empty"),
            "training kind": (c.post("/v1/training-jobs", json={"kind": "fly", "manifest": "s3://rib/m"}), 422,
                              "kind"),
            "training location": (c.post("/v1/training-jobs", json={"kind": "train", "manifest": "/etc/m"}), 422,
                                  "outside"),
            "training output": (c.post("/v1/training-jobs", json={"kind": "train", "manifest": "s3://rib/m",
                                                                  "output": "s3://rib/o"}), 422,
                                "chosen by the service"),
            "training config": (c.post("/v1/training-jobs", json={
                "kind": "train", "manifest": f"s3://{BUCKET}/m", "config": {"lr": -1, "arch": "resnet18"}}), 422,
                "greater than 0"),
        }
        for name, (response, status, message) in cases.items():
            assert response.status_code == status, (name, response.text)
            assert message in response.text, (name, response.text)
        errors = cases["manifest lines"][0].json()["errors"]
        assert [e["line"] for e in errors] == [3, 4, 5, 6]
        assert "duplicate id 'a'" in errors[2]["error"] and "cat" in errors[3]["error"]
        errors = cases["manifest escaping"][0].json()["errors"]
        assert [e["line"] for e in errors] == [3, 4]
        assert "'..'" in errors[0]["error"] and "outside" in errors[1]["error"]
        assert cases["duplicate ids"][0].json()["errors"] == [{"item": 2, "error": "duplicate id 'a'"}]
        assert [e["item"] for e in cases["escaping inline"][0].json()["errors"]] == [1, 2, 3]
    assert _job_keys(api) == before  # nothing was recorded, so nothing was queued
    assert not [k for k in api.objects("results/jobs/") if k.endswith("/uploads/f")]  # no upload was stored
    metrics = api.client.get("/metrics").text
    assert 'rib_requests_rejected_total{status="422"}' in metrics and 'status="413"' in metrics


def _queued_chunks(api: Api) -> list[list[Any]]:
    """The arguments of the tasks waiting on the image queue (no worker consumes them here)."""
    broker = redis.Redis.from_url(f"{api.redis_url}/0")
    messages = [json.loads(raw) for raw in broker.lrange(api.settings.image_queue, 0, -1)]
    return [json.loads(base64.b64decode(m["body"]))[0] for m in messages]  # Celery: body = [args, kwargs, ...]


def test_refinement_settings_travel_with_the_job(api: Api, demo: DemoDataset) -> None:
    record = demo.val.records[0]
    data = Path(demo.val.image_uri(record)).read_bytes()
    with api.authed() as c:
        r = c.post("/v1/images", files={"file": ("f.png", data, "image/png")},
                   data={"labels": list(record.labels), "refine": json.dumps({"crf": {"iterations": 3}})})
        assert r.status_code == 202, r.text
        status = c.get(f"/v1/jobs/{r.json()['job_id']}").json()
        # The service's default (RIB_REFINE_DEFAULTS) and the request's field, merged key by key.
        expected = RefineConfig.model_validate({"seed_threshold": 0.2, "crf": {"iterations": 3}})
        assert RefineConfig.model_validate(status["refine"]) == expected
        job_id = r.json()["job_id"]
        assert [args for args in _queued_chunks(api) if args[0] == job_id] == [[job_id, 0]]  # one chunk
        clients = api.client.app.state.clients  # type: ignore[attr-defined]
        spec = clients.store.read_spec(job_id, Records(clients.storage, api.settings.signing_key()))
        assert RefineConfig.model_validate(spec.refine) == expected  # what the worker reads back and runs
        assert RibConfig.model_validate(spec.rib).iterations == SMALL_RIB["iterations"]
        for bad, message in (('{"crf": {"iterations": 0}}', "invalid refinement parameters"),
                             ('{"walk": {"preset": "ade"}}', "invalid refinement parameters"),
                             ("[1]", "refine must be a JSON object"), ("{x", "refine must be a JSON object")):
            r = c.post("/v1/images", files={"file": ("f.png", data, "image/png")},
                       data={"labels": list(record.labels), "refine": bad})
            assert r.status_code == 422 and message in r.json()["detail"], (bad, r.text)
        item = {"id": record.id, "image": f"s3://{BUCKET}/x.png", "labels": list(record.labels)}
        r = c.post("/v1/jobs", json={"images": [item], "refine": {"seed_threshold": 2}})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "seed_threshold", r.text


def test_an_image_job_spec_survives_its_record(tmp_path: Path) -> None:
    """A chunk task carries only the job id and its chunk: the worker reads the job's images and
    settings back from its signed record."""
    spec = ImageJobSpec("bulk", [JobItem("a", "s3://b/a.png", ("cat", "dog"))],
                        RibConfig(preset="coco", iterations=3).model_dump(mode="json"),
                        RefineConfig(preset="coco").model_dump(mode="json"), 8, "owner", None)
    records = Records(LocalStorage(tmp_path), b"secret")
    save_request(records, "j" * 32, spec)
    again = ImageJobSpec.from_request(load_request(records, "j" * 32), records)
    assert again == spec and again.items[0].labels == ("cat", "dog")
    assert RibConfig.model_validate(again.rib) == RibConfig(preset="coco", iterations=3)


def test_progress_reads_images_per_minute_and_the_time_to_go() -> None:
    counts = {"queued": 6, "running": 2, "done": 3, "failed": 1, "skipped": 0}
    assert progress(counts, 1000.0, None, 1120.0) == {"images_per_minute": 2.0, "eta_s": 240.0, "remaining": 8}
    assert progress({**counts, "done": 0, "failed": 0}, 1000.0, None, 1120.0)["images_per_minute"] is None
    assert progress(counts, None, None, 1120.0) == {"images_per_minute": None, "eta_s": None, "remaining": 8}
    finished = {"queued": 0, "running": 0, "done": 4, "failed": 0, "skipped": 2}
    assert progress(finished, 1000.0, 1060.0, 5000.0) == {"images_per_minute": 4.0, "eta_s": 0.0, "remaining": 0}


def test_job_status_shows_progress_while_it_runs(api: Api) -> None:
    item = {"id": "a", "image": f"s3://{BUCKET}/a.png", "labels": ["digit1"]}
    with api.authed() as c:
        r = c.post("/v1/jobs", json={"images": [item, {**item, "id": "b"}]})
        job_id = r.json()["job_id"]
        assert c.get(f"/v1/jobs/{job_id}").json()["progress"] == {"images_per_minute": None, "eta_s": None,
                                                                    "remaining": 2}
        store = api.client.app.state.clients.store  # type: ignore[attr-defined]
        assert store.begin(job_id, "a", 3) == "run"
        store.r.hset(f"rib:job:{job_id}", "started_at", time.time() - 60)  # as if it started a minute ago
        store.mark_done(job_id, "a", ["meta.json"], 1.0)
        shown = c.get(f"/v1/jobs/{job_id}").json()
    assert shown["state"] == "running" and shown["progress"]["remaining"] == 1
    assert 0 < shown["progress"]["images_per_minute"] <= 1.0 and shown["progress"]["eta_s"] >= 60


def test_readyz_shows_the_classifier_a_worker_recorded(api: Api) -> None:
    store = api.client.app.state.clients.store  # type: ignore[attr-defined]
    store.r.delete("rib:model:classifier")
    shown = api.get("/readyz").json()["classifier"]
    assert shown["uri"] == CLASSIFIER and shown["val_map"] is None  # no worker has read it yet
    assert "classifier" not in api.client.get("/readyz").json()  # not without a key
    record_classifier(store.r, {"uri": "s3://rib/models/older.pth", "val_map": 0.5, "val_manifest": "v.jsonl"})
    assert api.get("/readyz").json()["classifier"]["val_map"] is None  # another checkpoint's record
    record_classifier(store.r, {"uri": CLASSIFIER, "val_map": 0.84, "val_manifest": "val.jsonl", "warning": None})
    shown = api.get("/readyz").json()["classifier"]
    assert (shown["uri"], shown["val_map"], shown["val_manifest"]) == (CLASSIFIER, 0.84, "val.jsonl")
