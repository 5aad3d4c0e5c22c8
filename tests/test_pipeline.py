"""Pipeline jobs (``/v1/pipelines``): a data set through classifier, RIB maps, IRN and DeepLab as one job.

In-process (fast): what the API refuses, and a job that no worker runs being cancelled. On the real
stack (heavy: redis-server, moto's S3 server, uvicorn, a Celery image worker and a training
worker): a small job end to end, every stage's outputs and reports read back; and the training
worker killed with SIGKILL during IRN's training, the job finishing with IRN resumed from its last
stored epoch. Settings are tiny for 2 CPU cores (12 scenes of 64 px, 1-2 epochs, 2 RIB steps).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from rib_core.classifier.cam import LocalizationMap
from rib_core.data.demo_data import DemoDataset
from tests.api_inprocess import Api, inprocess_api
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

API_KEY = "pipeline-key"
BUCKET = "rib"
IMAGES = 12
CLASSIFIER = {"recipe": "scratch", "arch": "resnet18", "epochs": 2, "batch_size": 4, "crop_size": 64,
              "resize_long": [48, 80]}
RIB = {"iterations": 2, "companions": 2, "crop_size": 64, "resize_long": [48, 96], "map_scales": [1.0],
       "loss_scales": [1.0]}


def irn(epochs: int) -> dict[str, Any]:
    return {"irn": {"arch": "resnet18", "crop_size": 64, "batch_size": 4, "epochs": epochs, "radius": 5}}


DEEPLAB = {"arch": "resnet18", "iterations": 3, "batch_size": 2, "crop_size": 64, "retrain": False,
           "checkpoint_every": 2, "scales": [1.0]}
FIGURES = os.environ.get("RIB_PIPELINE_FIGURES")  # where the e2e test writes its figures (printed with -s)


# ----------------------------------------------------------------------------- in-process: the API's checks


@pytest.fixture(scope="module")
def api(demo: DemoDataset, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with inprocess_api(tmp_path_factory.mktemp("redis"), demo.train.classes, [API_KEY, "other"]) as api:
        yield api


def test_bad_pipeline_requests_are_refused_with_what_to_fix(api: Api, demo: DemoDataset) -> None:
    manifest = upload_dataset(api.s3, BUCKET, "small", demo.train, records=6)
    unknown = demo.train.records[0]
    header = json.dumps({"format": "rib-manifest", "version": 1, "classes": demo.train.classes})
    line = json.dumps({"id": "x", "image": unknown.image, "labels": ["giraffe"]})
    api.s3.put_object(Bucket=BUCKET, Key="small/unknown.jsonl", Body=f"{header}\n{line}\n".encode())
    api.s3.put_object(Bucket=BUCKET, Key="small/headless.jsonl", Body=f"{line}\n".encode())
    cases = [
        ({"manifest_uri": f"s3://{BUCKET}/small/none.jsonl"}, "no manifest at"),
        ({"manifest_uri": "s3://elsewhere/m.jsonl"}, "outside the allowed locations"),
        ({"manifest_uri": f"s3://{BUCKET}/small/unknown.jsonl"}, "invalid manifest"),
        ({"manifest_uri": f"s3://{BUCKET}/small/headless.jsonl"}, "header naming its classes"),
        ({"manifest_uri": manifest, "classifier": {"epochs": 0}}, "invalid classifier settings"),
        ({"manifest_uri": manifest, "refine": {"irn": {"crop_size": 32, "radius": 10}}}, "invalid refinement"),
        ({"manifest_uri": manifest, "deeplab": {"iterations": -1}}, "invalid DeepLab settings"),
        ({"manifest_uri": manifest, "rib": {"iterations": "many"}}, "invalid RIB parameters"),
        ({"manifest_uri": manifest, "classifier_uri": "s3://elsewhere/c.pth"}, "classifier_uri"),
        ({"manifest_uri": manifest, "classifier": {"batch_size": 8}}, "fewer than one batch"),
        ({"manifest_uri": manifest, "stages": []}, "Extra inputs are not permitted"),
    ]
    for body, message in cases:
        r = api.post("/v1/pipelines", json=body)
        assert r.status_code == 422, (body, r.text)
        assert message in r.text, (body, r.text)
    line_error = api.post("/v1/pipelines", json={"manifest_uri": f"s3://{BUCKET}/small/unknown.jsonl"}).json()
    assert "giraffe" in json.dumps(line_error["errors"])
    r = api.post("/v1/pipelines", json={"manifest_uri": manifest, "classifier": {"epochs": 0}})
    assert r.json()["errors"][0]["field"] == "epochs"


def test_a_pipeline_no_worker_runs_is_queued_then_cancelled(api: Api, demo: DemoDataset) -> None:
    manifest = upload_dataset(api.s3, BUCKET, "queued", demo.train, records=4)
    r = api.post("/v1/pipelines", json={"manifest_uri": manifest, "classifier": {"batch_size": 2},
                                        "refine": irn(1), "deeplab": {}})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["stages"] == ["classifier", "maps", "refine", "deeplab"] and body["total"] == 4
    url = r.headers["location"]
    status = api.get(url).json()
    assert status["state"] == "queued" and {s["state"] for s in status["stages"].values()} == {"pending"}
    assert api.get(url, key="other").status_code == 404
    results = api.get(f"{url}/results").json()
    assert [i["id"] for i in results["items"]] == [rec.id for rec in demo.train.records[:4]]
    assert all(i["files"] == {} for i in results["items"])
    assert api.get(f"{url}/export", params={"format": "voc"}).status_code == 409  # no mask yet
    spec = json.loads(api.s3.get_object(Bucket=BUCKET, Key=f"results/jobs/{body['job_id']}/pipeline/"
                                                            "pipeline.json")["Body"].read())
    assert spec["classifier"]["batch_size"] == 2 and spec["refine"]["irn"]["epochs"] == 1
    cancelled = api.delete(url).json()
    assert cancelled["state"] == "cancelled"
    assert {s["state"] for s in cancelled["stages"].values()} == {"cancelled"}
    assert api.delete(url).status_code == 409
    # A job Redis lost is rebuilt from storage on its next GET and queued again.
    lost = api.post("/v1/pipelines", json={"manifest_uri": manifest, "classifier": {"batch_size": 2},
                                           "refine": irn(1)})
    broker = redis.Redis.from_url(f"{api.redis_url}/0")
    queued = broker.llen("rib.training")
    broker.delete(*broker.keys(f"rib:pipeline:{lost.json()['job_id']}*"))
    assert api.get(lost.headers["location"], key="other").status_code == 404  # rebuilt, but not theirs
    restored = api.get(lost.headers["location"])
    assert restored.status_code == 200 and restored.json()["state"] == "queued", restored.text
    assert broker.llen("rib.training") == queued + 1  # its first stage, queued again
    # A cancelled job Redis lost is rebuilt cancelled, and nothing is queued for it.
    broker.delete(*broker.keys(f"rib:pipeline:{body['job_id']}*"))
    rebuilt = api.get(url).json()
    assert rebuilt["state"] == "cancelled" and {s["state"] for s in rebuilt["stages"].values()} == {"cancelled"}
    assert broker.llen("rib.training") == queued + 1
    api.s3.put_object(Bucket=BUCKET, Key="c.pth", Body=b"a classifier")  # present at submit
    given = api.post("/v1/pipelines", json={"manifest_uri": manifest, "classifier_uri": f"s3://{BUCKET}/c.pth",
                                            "refine": irn(1)})
    assert given.json()["stages"] == ["classifier", "maps", "refine"]
    assert api.get(given.headers["location"]).json()["stages"]["classifier"]["state"] == "skipped"


# ----------------------------------------------------------------------------- the real stack


@dataclass
class PipelineStack:
    url: str
    s3: Any
    env: dict[str, str]
    logs: Path
    trainer: Process
    manifest: str

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": API_KEY}, timeout=120)

    def new_trainer(self, name: str) -> Process:
        self.trainer = start_worker(self.env, self.logs / f"{name}.log", "rib.training", name)
        return self.trainer

    def get(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def objects(self, prefix: str) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def pipeline_stack(demo: DemoDataset, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PipelineStack]:
    """The service with one image worker and one training worker. A short visibility timeout and
    lease, so that the kill test sees the killed stage delivered again within a minute."""
    logs = tmp_path_factory.mktemp("pipeline-logs")
    redis = RedisServer(logs)
    redis.start()
    try:
        with moto_s3() as endpoint:
            client = s3(endpoint)
            client.create_bucket(Bucket=BUCKET)
            manifest = upload_dataset(client, BUCKET, "dataset", demo.train, records=IMAGES, masks=True)
            env = {**os.environ, "RIB_BROKER_URL": f"{redis.url}/0", "RIB_RESULT_BACKEND": f"{redis.url}/1",
                   "RIB_STORAGE_URI": f"s3://{BUCKET}/results", "RIB_S3_ENDPOINT_URL": endpoint,
                   "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1", "RIB_API_KEYS": API_KEY, "RIB_DEVICE": "cpu",
                   "RIB_CHUNK_SIZE": "4", "RIB_VISIBILITY_TIMEOUT_S": "30", "RIB_CHUNK_TIME_LIMIT_S": "25",
                   "RIB_LEASE_S": "6", "OMP_NUM_THREADS": "1"}
            api, url = start_api(env, logs / "api.log")
            images = start_worker(env, logs / "images.log", "rib.images", "images")
            stack = PipelineStack(url, client, env, logs, start_worker(env, logs / "trainer-1.log", "rib.training",
                                                                       "trainer-1"), manifest)
            try:
                yield stack
            finally:
                stack.trainer.stop()
                images.stop()
                api.stop()
    finally:
        redis.stop()


def wait_pipeline(c: httpx.Client, url: str, timeout: float = 1500) -> dict[str, Any]:
    return wait_for(lambda: (s := c.get(url).json())["state"] in ("done", "failed", "cancelled") and s,
                    timeout, url, every=1)


def test_a_pipeline_job_runs_every_stage_end_to_end(pipeline_stack: PipelineStack, demo: DemoDataset) -> None:
    stack = pipeline_stack
    with stack.client() as c:
        r = c.post("/v1/pipelines", json={"manifest_uri": stack.manifest, "classifier": CLASSIFIER, "rib": RIB,
                                          "refine": irn(2), "deeplab": DEEPLAB})
        assert r.status_code == 202, r.text
        job_id, url = r.json()["job_id"], r.headers["location"]
        status = wait_pipeline(c, url)
        assert status["state"] == "done", (json.dumps(status, indent=1), stack.trainer.tail())
        stages = status["stages"]
        assert all(s["state"] == "done" and s["seconds"] is not None for s in stages.values())
        # Every stage's report.
        classifier = stages["classifier"]["report"]
        assert 0 <= classifier["val_map"] <= 1 and len(classifier["history"]) == CLASSIFIER["epochs"]
        assert stages["classifier"]["progress"] == {"epoch": 2, "epochs": 2}
        assert stages["maps"]["report"] == {"images": IMAGES, "maps": IMAGES}
        refine = stages["refine"]["report"]
        assert refine["images"] == refine["evaluated_images"] == IMAGES  # the manifest has masks
        for scored in ("seeds", "seeds_crf", "ir_labels", "masks"):
            assert "miou" in refine[scored] or "best" in refine[scored], scored
        assert [e["epoch"] for e in refine["irn"]["history"]] == [1, 2] and refine["irn"]["resumed_from_epoch"] == 0
        assert all(np.isfinite(e["loss"]) for e in refine["irn"]["history"])
        deeplab = stages["deeplab"]["report"]
        assert deeplab["steps"] == DEEPLAB["iterations"] and 0 <= deeplab["evaluation"]["miou"] <= 1
        shown = stages["deeplab"]["progress"]  # the last logged step of the last round
        assert shown["step"] == shown["steps"] == DEEPLAB["iterations"] and np.isfinite(shown["loss"]), shown
        # Every stage's outputs under the job's prefix, its report last.
        prefix = f"results/jobs/{job_id}/pipeline/"
        keys = set(stack.objects(prefix))
        for stage in stages:
            assert json.loads(stack.get(f"{prefix}stages/{stage}.json")) == stages[stage]["report"]
        assert {f"{prefix}classifier/classifier.pth", f"{prefix}refined/irn.pth", f"{prefix}deeplab/deeplab.pth",
                f"{prefix}refined/masks.jsonl", f"{prefix}index.json"} <= keys
        index = json.loads(stack.get(f"{prefix}index.json"))
        ids = [rec.id for rec in demo.train.records[:IMAGES]]
        assert [i["id"] for i in index] == ids
        results = c.get(f"{url}/results", params={"limit": 5}).json()
        assert results["total"] == IMAGES and results["next_offset"] == 5 and len(results["items"]) == 5
        roles = {"map", "crf_mask", "mask", "overlay", "confident_labels", "retrain_labels"}
        for item, entry in zip(results["items"], index, strict=False):
            assert set(item["files"]) == roles and set(entry["files"]) == roles
            record = demo.train.by_id(item["id"])
            mask = np.asarray(Image.open(io.BytesIO(httpx.get(item["files"]["mask"]["url"]).content)))
            lmap = LocalizationMap.from_bytes(stack.get(item["files"]["map"]["uri"].split("/", 3)[3]))
            assert mask.shape == lmap.high_res.shape[1:]
            allowed = {0, 255} | {demo.train.classes.index(c) + 1 for c in record.labels}
            assert set(np.unique(mask).tolist()) <= allowed
        export = c.get(f"{url}/export", params={"format": "coco"})
        assert export.status_code == 200 and export.json()["images"] == IMAGES, export.text
        assert export.json()["key"] == f"jobs/{job_id}/pipeline/exports/coco.zip"
        archive = zipfile.ZipFile(io.BytesIO(httpx.get(export.json()["url"]).content))
        coco = json.loads(archive.read("annotations/instances_default.json"))
        assert len(coco["images"]) == IMAGES
        assert len([n for n in archive.namelist() if n.startswith("images/")]) == IMAGES
        scores = [a["score"] for a in coco["annotations"]]  # M's mean inside each region
        assert all(0 <= v <= 1 for v in scores) and max(scores) > 0
        assert c.delete(url).status_code == 409
    figures = {"images": IMAGES, "stage_seconds": {k: s["seconds"] for k, s in stages.items()},
               "classifier_val_map": classifier["val_map"], "seed_best": refine["seeds"]["best"]["miou"],
               "seed_crf_miou": refine["seeds_crf"]["miou"], "confident_labels_miou": refine["ir_labels"]["miou"],
               "irn_loss": [e["loss"] for e in refine["irn"]["history"]], "mask_miou": refine["masks"]["miou"],
               "deeplab_miou": deeplab["evaluation"]["miou"]}
    print("pipeline figures:", json.dumps(figures, indent=1))
    if FIGURES:
        Path(FIGURES).write_text(json.dumps(figures, indent=1))


def test_a_pipeline_survives_its_training_worker_killed_during_irn(pipeline_stack: PipelineStack) -> None:
    """SIGKILL the training worker once IRN has stored an epoch; a new worker resumes IRN from it."""
    stack = pipeline_stack
    epochs = 6
    with stack.client() as c:
        r = c.post("/v1/pipelines", json={"manifest_uri": stack.manifest, "classifier": CLASSIFIER, "rib": RIB,
                                          "refine": irn(epochs)})
        assert r.status_code == 202, r.text
        job_id, url = r.json()["job_id"], r.headers["location"]
        state_key = f"results/jobs/{job_id}/pipeline/refined/irn_state.pth"

        def irn_epoch_stored() -> bool:
            progress = c.get(url).json()["stages"]["refine"]["progress"] or {}
            return progress.get("epoch", 0) >= 1 and bool(stack.objects(state_key))

        wait_for(irn_epoch_stored, 1200, "IRN's first stored epoch", every=0.2)
        stack.trainer.kill()
        killed_at = c.get(url).json()
        assert killed_at["state"] == "running" and killed_at["stages"]["refine"]["state"] == "running"
        stack.new_trainer("trainer-2")
        status = wait_pipeline(c, url)
    assert status["state"] == "done", (json.dumps(status, indent=1), stack.trainer.tail())
    report = status["stages"]["refine"]["report"]["irn"]
    assert report["resumed_from_epoch"] >= 1, report  # resumed, not restarted
    assert [e["epoch"] for e in report["history"]] == list(range(1, epochs + 1))


def test_cancel_stops_a_pipeline_at_its_running_stage(pipeline_stack: PipelineStack) -> None:
    """DELETE during IRN's training: IRN stops at its next epoch, DeepLab never starts."""
    stack = pipeline_stack
    with stack.client() as c:
        r = c.post("/v1/pipelines", json={"manifest_uri": stack.manifest, "classifier": CLASSIFIER, "rib": RIB,
                                          "refine": irn(8), "deeplab": DEEPLAB})
        job_id, url = r.json()["job_id"], r.headers["location"]
        wait_for(lambda: (c.get(url).json()["stages"]["refine"]["progress"] or {}).get("epoch", 0) >= 1, 1200,
                 "IRN's first epoch", every=0.2)
        cancelling = c.delete(url)
        assert cancelling.status_code == 200, cancelling.text
        body = cancelling.json()
        assert body["state"] == "cancelling" and body["stages"]["deeplab"]["state"] == "cancelled"
        status = wait_pipeline(c, url)
    stages = status["stages"]
    assert status["state"] == "cancelled" and status["cancelled"], status
    assert stages["classifier"]["state"] == stages["maps"]["state"] == "done"
    assert stages["refine"]["state"] == stages["deeplab"]["state"] == "cancelled"
    assert (stages["refine"]["progress"] or {}).get("epoch", 0) < 8
    prefix = f"results/jobs/{job_id}/pipeline/"
    assert not stack.objects(f"{prefix}stages/refine.json") and not stack.objects(f"{prefix}deeplab/")
    assert stack.objects(f"{prefix}cancelled.json")  # kept in storage: a rebuilt job stays cancelled
