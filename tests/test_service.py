"""The service on the real stack: uvicorn + a Celery worker + a private redis-server + moto's S3 server.

Images go through the real RIB code (the session's ResNet-18, companions = the demo train split on
S3, small RIB settings) and results are read back from S3 with boto3. A worker is killed with
SIGKILL in the middle of a bulk job and a new one finishes it; cancellation is checked against the
running processes. What needs no worker (health, keys, every kind of bad input) runs in-process in
tests/test_api.py.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from rib_core.classifier.cam import LocalizationMap
from rib_core.classifier.evaluate import classifier_quality
from rib_core.data.datasets import Manifest, ManifestRecord
from tests.service_stack import (
    Process,
    RedisServer,
    moto_s3,
    s3,
    start_api,
    start_worker,
    upload_dataset,
    wait_for,
)

API_KEY = "test-key"
AUTH = {"X-API-Key": API_KEY}
BUCKET = "rib"
# Small RIB settings for 2 CPU cores (the paper's are the defaults): 2 steps, 2 companions, 64 px crops.
SMALL_RIB = {"iterations": 2, "companions": 2, "crop_size": 64, "resize_long": [48, 96],
             "map_scales": [1.0], "loss_scales": [1.0]}
MAX_UPLOAD = 300_000
MAX_PIXELS = 250_000
CRF_ARTIFACTS = {"map.npz", "map.png", "crf_mask.png", "crf_overlay.png", "meta.json"}


@dataclass
class Stack:
    url: str
    s3: Any
    endpoint: str
    redis: RedisServer
    env: dict[str, str]
    logs: Path
    api: Process
    worker: Process
    train: Manifest
    val: Manifest

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=AUTH, timeout=120)

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def new_worker(self, name: str, pool: str = "solo", **settings: str) -> Process:
        """Start an image worker (``settings`` override the stack's environment) and make it the stack's."""
        self.worker = start_worker({**self.env, **settings}, self.logs / f"{name}.log", "rib.images", name, pool)
        return self.worker

    def objects(self, prefix: str) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def get(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()


@contextmanager
def running_stack(demo: Any, classifier_path: Path, logs: Path, **settings: str) -> Iterator[Stack]:
    """The service on private processes, with one solo image worker; ``settings`` override variables."""
    redis = RedisServer(logs)
    redis.start()
    try:
        with moto_s3() as endpoint:
            client = s3(endpoint)
            client.create_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key="models/classifier.pth", Body=classifier_path.read_bytes())
            companions = upload_dataset(client, BUCKET, "companions", demo.train)
            env = {
                **os.environ,
                "RIB_BROKER_URL": f"{redis.url}/0", "RIB_RESULT_BACKEND": f"{redis.url}/1",
                "RIB_STORAGE_URI": f"s3://{BUCKET}/results", "RIB_S3_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "RIB_CLASSIFIER_URI": f"s3://{BUCKET}/models/classifier.pth",
                "RIB_COMPANION_MANIFEST_URI": companions, "RIB_API_KEYS": f"other-key,{API_KEY}", "RIB_DEVICE": "cpu",
                "RIB_RIB_DEFAULTS": json.dumps(SMALL_RIB), "RIB_CHUNK_SIZE": "2",
                "RIB_MAX_UPLOAD_BYTES": str(MAX_UPLOAD), "RIB_MAX_IMAGE_PIXELS": str(MAX_PIXELS),
                # Short enough that the test sees a killed worker's chunk redelivered, longer than any chunk.
                "RIB_VISIBILITY_TIMEOUT_S": "20", "RIB_CHUNK_TIME_LIMIT_S": "15",
                "OMP_NUM_THREADS": "1", **settings,
            }
            api, url = start_api(env, logs / "api.log")
            worker = start_worker(env, logs / "worker-1.log", "rib.images", "worker-1")
            stack = Stack(url, client, endpoint, redis, env, logs, api, worker, demo.train, demo.val)
            try:
                yield stack
            finally:
                stack.worker.stop()
                api.stop()
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def stack(demo: Any, classifier_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(demo, classifier_path, tmp_path_factory.mktemp("service-logs")) as stack:
        yield stack


def size_of(manifest: Manifest, record: ManifestRecord) -> tuple[int, int]:
    with Image.open(manifest.image_uri(record)) as im:
        return im.height, im.width


def wait_finished(c: httpx.Client, job_id: str, timeout: float = 240) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        status = c.get(f"/v1/jobs/{job_id}").json()
        return status if status["state"] in ("done", "failed", "cancelled") else None

    return wait_for(finished, timeout, f"job {job_id}", every=0.5)


def all_results(c: httpx.Client, job_id: str, limit: int) -> list[dict[str, Any]]:
    items, offset = [], 0
    while offset is not None:
        page = c.get(f"/v1/jobs/{job_id}/results", params={"offset": offset, "limit": limit}).json()
        assert len(page["items"]) <= limit
        items += page["items"]
        offset = page["next_offset"]
    return items


def check_artifacts(stack: Stack, item: dict[str, Any], labels: list[str], size: tuple[int, int]) -> None:
    """The files of one finished image, read back from S3: complete, consistent, the right shapes."""
    keys = {name: f["uri"].removeprefix(f"s3://{BUCKET}/") for name, f in item["artifacts"].items()}
    assert set(keys) == CRF_ARTIFACTS
    folder = keys["meta.json"].rsplit("/", 1)[0]
    assert sorted(stack.objects(folder + "/")) == sorted(keys.values())
    classes = stack.train.classes
    mask = np.asarray(Image.open(io.BytesIO(stack.get(keys["crf_mask.png"]))))
    assert mask.shape == size
    assert set(np.unique(mask).tolist()) <= {0} | {classes.index(c) + 1 for c in labels}
    lmap = LocalizationMap.from_bytes(stack.get(keys["map.npz"]))
    assert sorted(lmap.keys.tolist()) == sorted(classes.index(c) for c in labels)
    assert lmap.high_res.shape[1:] == size
    meta = json.loads(stack.get(keys["meta.json"]))
    assert meta["classes"] == labels and meta["size"] == list(size)
    assert meta["stats"]["steps"] <= SMALL_RIB["iterations"]


def test_upload_goes_through_rib_to_s3(stack: Stack) -> None:
    record = max(stack.val.records, key=lambda r: len(r.labels))
    data = Path(stack.val.image_uri(record)).read_bytes()
    with stack.client() as c:
        # Without wait: 202 and a job to poll (this also warms the worker up: it loads the model once).
        r = c.post("/v1/images", files={"file": ("first.png", data, "image/png")},
                   data={"labels": list(record.labels)[:1], "rib": json.dumps({"iterations": 1})})
        assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['job_id']}", r.text
        assert r.json()["image_id"] == "first"
        status = wait_finished(c, r.json()["job_id"])
        assert status["state"] == "done" and status["rib"]["iterations"] == 1  # the request's override
        assert status["timing"]["finished_at"] >= status["timing"]["started_at"] >= status["timing"]["created_at"]
        # With wait: the result inline.
        r = c.post("/v1/images", params={"wait": 60}, files={"file": ("scene.png", data, "image/png")},
                   data={"labels": ",".join(record.labels), "image_id": record.id})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["state"] == "done" and body["counts"]["done"] == 1 and body["kind"] == "upload"
        assert body["rib"]["iterations"] == SMALL_RIB["iterations"]  # the service defaults apply
        item = body["results"]["items"][0]
        assert item["id"] == record.id and item["status"] == "done" and item["attempts"] == 1
        check_artifacts(stack, item, list(record.labels), size_of(stack.val, record))
        # The presigned URL serves the same bytes as S3 itself.
        assert httpx.get(item["mask"]["url"]).content == stack.get(item["mask"]["uri"].split("/", 3)[3])
        job_id = body["job_id"]
        index = json.loads(stack.get(f"results/jobs/{job_id}/index.json"))
        assert index["state"] == "done" and [i["id"] for i in index["images"]] == [record.id]
        assert stack.get(f"results/jobs/{job_id}/uploads/{record.id}") == data
        # A finished job cannot be cancelled.
        assert c.delete(f"/v1/jobs/{job_id}").status_code == 409


def test_readyz_shows_the_classifier_the_workers_serve(stack: Stack, classifier_path: Path) -> None:
    """A worker records its classifier's validation mAP at start-up; the API (no torch) shows it."""
    recorded = classifier_quality(classifier_path)["val_map"]
    uri = stack.env["RIB_CLASSIFIER_URI"]

    def shown() -> dict[str, Any] | None:
        info = httpx.get(f"{stack.url}/readyz", headers=AUTH).json()["classifier"]
        return info if info.get("recorded_at") else None

    info = wait_for(shown, 120, "the worker's record of its classifier")
    assert info["uri"] == uri and info["val_map"] == recorded
    assert "classifier" not in httpx.get(f"{stack.url}/readyz").json()


def test_per_image_errors_are_reported_and_the_rest_finishes(stack: Stack) -> None:
    record = stack.train.records[0]
    with stack.client() as c:
        r = c.post("/v1/jobs", json={"images": [
            {"id": "fine", "image": f"s3://{BUCKET}/companions/{record.image}", "labels": list(record.labels)},
            {"id": "gone", "image": f"s3://{BUCKET}/companions/images/missing.png", "labels": ["digit3"]}]})
        assert r.status_code == 202, r.text
        status = wait_finished(c, r.json()["job_id"])
        assert status["state"] == "done" and status["counts"] == {
            "queued": 0, "running": 0, "done": 1, "failed": 1, "skipped": 0}
        assert status["errors"][0]["id"] == "gone" and "not found" in status["errors"][0]["error"]
        items = {i["id"]: i for i in all_results(c, r.json()["job_id"], 10)}
        assert items["gone"]["status"] == "failed" and items["gone"]["artifacts"] == {}
        assert items["fine"]["status"] == "done"


def test_bulk_job_on_the_batched_engine(stack: Stack) -> None:
    """The engine CUDA workers use by default, forced on this CPU worker: a chunk's two images of
    one size are fine-tuned in one batched step; a missing image fails alone."""
    records = stack.train.records[20:22]
    batched = {"engine": "batched", "max_images_per_batch": 2}
    with stack.client() as c:
        r = c.post("/v1/jobs", json={"rib": batched, "images": [
            *({"id": rec.id, "image": f"s3://{BUCKET}/companions/{rec.image}", "labels": list(rec.labels)}
              for rec in records),
            {"id": "gone", "image": f"s3://{BUCKET}/companions/images/missing.png", "labels": ["digit3"]}]})
        assert r.status_code == 202, r.text
        status = wait_finished(c, r.json()["job_id"])
        assert status["counts"]["done"] == 2 and status["counts"]["failed"] == 1, status
        items = {i["id"]: i for i in all_results(c, r.json()["job_id"], 10)}
    for record in records:
        check_artifacts(stack, items[record.id], list(record.labels), size_of(stack.train, record))
        meta = json.loads(stack.get(items[record.id]["artifacts"]["meta.json"]["uri"].split("/", 3)[3]))
        assert meta["stats"]["engine"] == "batched" and meta["stats"]["images_in_step"] == 2


def test_a_job_exports_its_masks_to_coco_labelstudio_and_voc(stack: Stack) -> None:
    """The export route writes one zip per format next to the job's results; decoded by each
    format's own library it gives back the job's stored masks pixel for pixel."""
    from label_studio_sdk.converter.brush import decode_rle
    from pycocotools import mask as coco_mask

    records = stack.train.records[24:26]
    with stack.client() as c:
        r = c.post("/v1/jobs", json={"images": [
            {"id": rec.id, "image": f"s3://{BUCKET}/companions/{rec.image}", "labels": list(rec.labels)}
            for rec in records]})
        job_id = r.json()["job_id"]
        assert c.get(f"/v1/jobs/{job_id}/export", params={"format": "tiff"}).status_code == 422
        assert wait_finished(c, job_id)["counts"]["done"] == 2
        stored = {i["id"]: np.asarray(Image.open(io.BytesIO(httpx.get(i["mask"]["url"]).content)))
                  for i in all_results(c, job_id, 10)}
        archives = {}
        for fmt in ("coco", "labelstudio", "voc"):
            link = c.get(f"/v1/jobs/{job_id}/export", params={"format": fmt})
            assert link.status_code == 200, link.text
            assert link.json()["key"] == f"jobs/{job_id}/exports/{fmt}.zip" and link.json()["images"] == 2
            assert link.json()["uri"] == f"s3://{BUCKET}/results/jobs/{job_id}/exports/{fmt}.zip"
            archives[fmt] = zipfile.ZipFile(io.BytesIO(httpx.get(link.json()["url"]).content))
    classes = stack.train.classes
    coco = json.loads(archives["coco"].read("annotations/instances_default.json"))
    tasks = json.loads(archives["labelstudio"].read("tasks.json"))
    assert all(0 <= a["score"] <= 1 for a in coco["annotations"])  # COCOeval reads it as results too
    assert all(0 <= r["score"] <= 1 for t in tasks for r in t["predictions"][0]["result"])
    for rec in records:
        mask = stored[rec.id]
        known = mask != 255
        image = next(i for i in coco["images"] if i["file_name"] == rec.image.rsplit("/", 1)[1])
        source = stack.get(f"companions/{rec.image}")  # the images travel with COCO and VOC
        assert archives["coco"].read(f"images/{image['file_name']}") == source
        assert f"JPEGImages/{rec.id}.jpg" in archives["voc"].namelist()
        painted = np.zeros_like(mask)
        for a in (a for a in coco["annotations"] if a["image_id"] == image["id"]):
            painted[coco_mask.decode(a["segmentation"]) > 0] = a["category_id"]
        assert (painted[known] == mask[known]).all()
        task = next(t for t in tasks if t["data"]["image_id"] == rec.id)
        painted = np.zeros_like(mask)
        for region in task["predictions"][0]["result"]:
            value = region["value"]
            rgba = np.reshape(decode_rle(value["rle"]), (*mask.shape, 4))
            painted[rgba[..., 3] > 0] = classes.index(value["brushlabels"][0]) + 1
        assert (painted[known] == mask[known]).all()
        voc = np.asarray(Image.open(io.BytesIO(archives["voc"].read(f"SegmentationClass/{rec.id}.png"))))
        assert (voc == mask).all()


def test_cancel_skips_images_not_started_and_leaves_nothing_half_written(stack: Stack) -> None:
    images = [{"id": r.id, "image": f"s3://{BUCKET}/companions/{r.image}", "labels": list(r.labels)}
              for r in stack.train.records[20:32]]
    with stack.client() as c:
        r = c.post("/v1/jobs", json={"images": images})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        cancelled = c.delete(f"/v1/jobs/{job_id}")
        assert cancelled.status_code == 200 and cancelled.json()["state"] in ("cancelling", "cancelled")
        status = wait_finished(c, job_id)
        counts = status["counts"]
        assert status["state"] == "cancelled" and counts["queued"] == counts["running"] == 0
        assert counts["skipped"] >= 1 and counts["done"] + counts["skipped"] + counts["failed"] == len(images)
        assert c.delete(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"  # idempotent
        for item in all_results(c, job_id, 5):
            written = stack.objects(f"results/jobs/{job_id}/images/{item['id']}/")
            if item["status"] == "skipped":
                assert written == [] and item["attempts"] == 0
            else:
                assert item["status"] == "done" and {k.rsplit("/", 1)[1] for k in written} == CRF_ARTIFACTS
        index = json.loads(stack.get(f"results/jobs/{job_id}/index.json"))
        assert index["state"] == "cancelled" and index["counts"] == counts


@pytest.mark.slow
def test_bulk_job_survives_a_worker_killed_mid_job(stack: Stack) -> None:
    records = stack.train.records[:20]
    manifest_uri = upload_dataset(stack.s3, BUCKET, "companions", stack.train, name="bulk20.jsonl", records=20)
    with stack.client() as c:
        r = c.post("/v1/jobs", json={"manifest_uri": manifest_uri})
        assert r.status_code == 202 and r.json()["total"] == 20, r.text
        job_id = r.json()["job_id"]

        def progressed() -> dict[str, Any] | None:
            status = c.get(f"/v1/jobs/{job_id}").json()
            return status if status["counts"]["done"] >= 4 else None

        status = wait_for(progressed, 240, "the first images of the bulk job", every=0.2)
        stack.worker.kill()  # SIGKILL mid-job: its chunk stays unacknowledged in Redis
        done_at_kill = c.get(f"/v1/jobs/{job_id}").json()["counts"]["done"]
        assert status["state"] == "running" and done_at_kill < 20
        stack.new_worker("worker-2")
        status = wait_finished(c, job_id, timeout=300)
        assert status["state"] == "done", stack.worker.tail()
        assert status["counts"] == {"queued": 0, "running": 0, "done": 20, "failed": 0, "skipped": 0}
        items = all_results(c, job_id, 7)
    assert [i["id"] for i in items] == [r.id for r in records]
    # Only images a dead worker had started are redone: at most one per killed worker.
    assert 20 <= sum(i["attempts"] for i in items) <= 21
    for item, record in zip(items, records, strict=True):
        check_artifacts(stack, item, list(record.labels), size_of(stack.train, record))
    keys = stack.objects(f"results/jobs/{job_id}/images/")
    assert len(keys) == len(set(keys)) == 20 * len(CRF_ARTIFACTS)
    index = json.loads(stack.get(f"results/jobs/{job_id}/index.json"))
    assert index["counts"]["done"] == 20 and sorted(i["id"] for i in index["images"]) == sorted(r.id for r in records)
    assert "rib_worker_images_total" in httpx.get(f"{stack.url}/metrics").text


@pytest.mark.slow
def test_training_jobs_run_on_the_training_queue(stack: Stack) -> None:
    """A DeepLab train job, then an evaluate job with its checkpoint, through a training worker."""
    manifest_uri = upload_dataset(stack.s3, BUCKET, "deeplab-data", stack.train, records=8, masks=True)
    # A training worker's visibility timeout must exceed its longest job (the image workers' 20 s would not).
    env = {**stack.env, "RIB_VISIBILITY_TIMEOUT_S": "3600", "RIB_CHUNK_TIME_LIMIT_S": "1800"}
    # Every consumer of a broker restores any task unacknowledged for longer than its own visibility
    # timeout, whatever the queue: with the image worker's 20 s, a training job longer than that is
    # handed out again and again. So the image worker pauses while the training jobs run.
    stack.worker.stop()
    trainer = start_worker(env, stack.logs / "trainer.log", "rib.training", "trainer")
    tiny = {"arch": "resnet18", "iterations": 3, "batch_size": 2, "crop_size": 64, "retrain": False,
            "checkpoint_every": 2, "scales": [1.0]}
    try:
        with stack.client() as c:
            def run(spec: dict[str, Any]) -> dict[str, Any]:
                r = c.post("/v1/training-jobs", json=spec)
                assert r.status_code == 202, r.text
                url = r.headers["location"]
                assert c.get(url).json()["state"] in ("queued", "running")
                return wait_for(lambda: (s := c.get(url).json())["state"] in ("done", "failed") and s,
                                300, "the training job", every=1)

            trained = run({"kind": "train", "manifest": manifest_uri, "config": tiny, "evaluate_on": manifest_uri})
            assert trained["state"] == "done", (trained, trainer.tail())
            out = f"results/jobs/{trained['job_id']}/training"  # the job's own prefix, the service's choice
            checkpoint = trained["result"]["checkpoint"]
            assert checkpoint == f"s3://{BUCKET}/{out}/deeplab.pth" and stack.objects(f"{out}/deeplab.pth")
            assert trained["result"]["steps"] == 3 and {k: trained["spec"]["config"][k] for k in tiny} == tiny
            # evaluate_on: the same job scored the trained network and predicted the manifest's images.
            evaluation = trained["result"]["evaluation"]
            assert evaluation["images"] == evaluation["predicted"] == 8
            assert json.loads(stack.get(f"{out}/evaluation/report.json"))["miou"] == evaluation["miou"]
            assert len(stack.objects(f"{out}/evaluation/masks/")) == 8
            # The owner evaluates with its own job's checkpoint (a file of its own job in the results).
            scored = run({"kind": "evaluate", "manifest": manifest_uri, "checkpoint": checkpoint, "config": tiny})
            assert scored["state"] == "done", (scored, trainer.tail())
            report = json.loads(stack.get(f"results/jobs/{scored['job_id']}/training/report.json"))
            assert report["miou"] == scored["result"]["miou"] and 0 <= report["miou"] <= 1
            assert c.get("/v1/training-jobs/0123456789abcdef0123456789abcdef").status_code == 404
            missing = c.post("/v1/training-jobs", json={"kind": "evaluate", "manifest": manifest_uri,
                                                        "checkpoint": f"s3://{BUCKET}/deeplab/none.pth"})
            assert missing.status_code == 422 and "none.pth" in missing.text, missing.text
    finally:
        trainer.stop()
        stack.new_worker("worker-3")
