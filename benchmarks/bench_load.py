"""Latency and throughput of the service under load, on the real local stack, against ``rib rib``.

The stack is the tests' (``tests/service_stack.py``): a private redis-server, moto's S3 server, the
API under uvicorn and one Celery image worker, all on this machine. The model is a ResNet-18
classifier with random weights on demo scenes: what is measured is the service's cost, not the
maps' quality. Three phases, each printing p50 / p99 latency (ms) per call and the errors:

1. ``--uploads`` concurrent ``POST /v1/images?wait=`` while ``/healthz`` and job status are polled
   every 50 ms: whether waiting clients stall the API. ``healthz_while_all_wait`` keeps the
   samples taken while every upload is recorded and waiting (after the burst of submissions).
2. ``--bulk`` images in one bulk job, submitted and polled to the end: images per hour through the
   stack (submission to ``done``, the worker already warm).
3. ``rib rib`` (the CLI) on the same images with the same RIB settings: images per hour without the
   service. ``overhead`` is CLI / stack images per hour. The CLI's time includes its start and its
   model load, the stack's worker is already warm: on a handful of images this favours the stack.

Usage: ``python -m benchmarks.bench_load --uploads 50 --bulk 8``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis

from rib_core.data.datasets import Manifest
from rib_core.data.demo_data import DemoDataConfig, make_demo_dataset
from rib_core.runtime.provenance import run_record
from rib_core.training.checkpoints import save_classifier
from rib_core.training.networks import CamNet
from tests.service_stack import moto_s3, redis_server, s3, start_api, start_worker, upload_dataset, wait_for

BUCKET = "rib"
KEY = "bench-key"
# Small RIB settings for a CPU: 2 steps, 2 companions, 64 px crops at one scale.
SMALL_RIB = {"iterations": 2, "companions": 2, "crop_size": 64, "resize_long": [48, 96],
             "map_scales": [1.0], "loss_scales": [1.0]}


def percentiles(samples: list[float]) -> dict[str, float | int]:
    if not samples:
        return {"n": 0}
    ms = np.asarray(samples) * 1000
    return {"n": len(samples), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "max_ms": round(float(ms.max()), 1)}


class Recorder:
    """Latencies and failures of one kind of call, from many threads."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.errors: dict[str, int] = {}
        self.lock = threading.Lock()

    def call(self, fn: Callable[[], httpx.Response], ok: tuple[int, ...] = (200,)) -> httpx.Response | None:
        started = time.perf_counter()
        try:
            r = fn()
        except httpx.HTTPError as e:
            with self.lock:
                self.errors[type(e).__name__] = self.errors.get(type(e).__name__, 0) + 1
            return None
        with self.lock:
            self.seconds.append(time.perf_counter() - started)
            if r.status_code not in ok:
                self.errors[str(r.status_code)] = self.errors.get(str(r.status_code), 0) + 1
        return r

    def summary(self) -> dict[str, Any]:
        return {**percentiles(self.seconds), "errors": self.errors}


def poll_while(stop: threading.Event, url: str, job_ids: list[str], healthz: Recorder, status: Recorder,
               all_waiting: Callable[[], bool], while_waiting: Recorder) -> None:
    """/healthz (and a job's status) every 50 ms; /healthz also into ``while_waiting`` once every
    upload is recorded and waiting, until the first one returns."""
    with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=60) as c:
        while not stop.is_set():
            waiting = all_waiting()
            r = healthz.call(lambda: c.get("/healthz"))
            if waiting and r is not None:
                while_waiting.seconds.append(healthz.seconds[-1])
            if job_ids:
                status.call(lambda: c.get(f"/v1/jobs/{job_ids[-1]}"))
            time.sleep(0.05)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--uploads", type=int, default=50, help="concurrent waiting uploads")
    p.add_argument("--wait", type=float, default=20, help="?wait= of each upload, seconds")
    p.add_argument("--bulk", type=int, default=8, help="images of the bulk job (and of rib rib)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    demo = make_demo_dataset(work / "demo", DemoDataConfig(n_train=16, n_val=max(args.bulk, 8), canvas=64,
                                                           digit_size=(26, 40), digits=[0, 1, 2], max_per_image=2))
    classifier = work / "classifier.pth"
    save_classifier(CamNet(len(demo.train.classes), "resnet18"), demo.train.classes, classifier)
    report: dict[str, Any] = {"run": run_record(), "uploads": args.uploads,
                              "wait_s": args.wait, "bulk": args.bulk, "rib": SMALL_RIB}
    with redis_server(work) as redis_url, moto_s3() as endpoint:
        client = s3(endpoint)
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key="models/classifier.pth", Body=classifier.read_bytes())
        companions = upload_dataset(client, BUCKET, "companions", demo.train)
        bulk_manifest = upload_dataset(client, BUCKET, "bulk", demo.val, records=args.bulk)
        env = {**os.environ, "RIB_BROKER_URL": f"{redis_url}/0", "RIB_RESULT_BACKEND": f"{redis_url}/1",
               "RIB_STORAGE_URI": f"s3://{BUCKET}/results", "RIB_S3_ENDPOINT_URL": endpoint,
               "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "RIB_CLASSIFIER_URI": f"s3://{BUCKET}/models/classifier.pth", "RIB_COMPANION_MANIFEST_URI": companions,
               "RIB_API_KEYS": KEY, "RIB_DEVICE": "cpu", "RIB_RIB_DEFAULTS": json.dumps(SMALL_RIB),
               "RIB_CHUNK_SIZE": "2", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        api, url = start_api(env, work / "api.log")
        worker = start_worker(env, work / "worker.log", "rib.images", "bench")
        try:
            report["waiting_uploads"] = waiting_uploads(url, redis_url, demo.val, args.uploads, args.wait)
            report["bulk_job"] = bulk_job(url, bulk_manifest, args.bulk)
        finally:
            worker.stop()
            api.stop()
    report["rib_cli"] = rib_cli(classifier, demo, args.bulk, work)
    report["overhead"] = round(report["rib_cli"]["images_per_hour"] / report["bulk_job"]["images_per_hour"], 2)
    print(json.dumps(report, indent=1))


def waiting_uploads(url: str, redis_url: str, manifest: Any, n: int, wait: float) -> dict[str, Any]:
    """``n`` uploads with ``?wait`` at once, /healthz and a job's status polled meanwhile."""
    images = [Path(manifest.image_uri(r)).read_bytes() for r in manifest.records]
    labels = [",".join(r.labels) for r in manifest.records]
    uploads, healthz, status, while_waiting = Recorder(), Recorder(), Recorder(), Recorder()
    job_ids: list[str] = []
    jobs = redis.Redis.from_url(f"{redis_url}/0")

    def all_waiting() -> bool:
        return len(list(jobs.scan_iter("rib:job:*:order"))) >= n and not uploads.seconds

    stop = threading.Event()
    poller = threading.Thread(target=poll_while, args=(stop, url, job_ids, healthz, status, all_waiting,
                                                       while_waiting))
    poller.start()

    def one(i: int) -> None:
        with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=wait + 60) as c:
            r = uploads.call(lambda: c.post("/v1/images", params={"wait": wait},
                                            files={"file": (f"u{i}.png", images[i % len(images)], "image/png")},
                                            data={"labels": labels[i % len(labels)]}), ok=(200, 202))
            if r is not None and r.status_code in (200, 202):
                job_ids.append(r.json()["job_id"])

    started = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(one, range(n)))
    stop.set()
    poller.join()
    with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=60) as c:  # leave the worker idle
        for job_id in job_ids:
            c.delete(f"/v1/jobs/{job_id}")
    return {"seconds": round(time.perf_counter() - started, 1), "upload": uploads.summary(),
            "healthz": healthz.summary(), "healthz_while_all_wait": while_waiting.summary(),
            "status": status.summary()}


def bulk_job(url: str, manifest_uri: str, n: int) -> dict[str, Any]:
    with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=60) as c:
        submit, status = Recorder(), Recorder()
        started = time.perf_counter()
        r = submit.call(lambda: c.post("/v1/jobs", json={"manifest_uri": manifest_uri}), ok=(202,))
        assert r is not None and r.status_code == 202, r.text if r is not None else "no answer"
        job_id = r.json()["job_id"]

        def finished() -> dict[str, Any] | None:
            s = status.call(lambda: c.get(f"/v1/jobs/{job_id}"))
            body = s.json() if s is not None and s.status_code == 200 else {}
            return body if body.get("state") in ("done", "failed", "cancelled") else None

        final = wait_for(finished, 3600, "the bulk job", every=0.5)
        seconds = time.perf_counter() - started
    return {"state": final["state"], "counts": final["counts"], "seconds": round(seconds, 1),
            "images_per_hour": round(n / seconds * 3600), "submit": submit.summary(), "status": status.summary()}


def rib_cli(classifier: Path, demo: Any, n: int, work: Path) -> dict[str, Any]:
    """``rib rib`` on the bulk job's images, one process from start to end (its model load included)."""
    subset = work / "bulk.jsonl"
    Manifest(demo.val.classes, [replace(r, image=demo.val.image_uri(r), mask=None)
                                for r in demo.val.records[:n]]).save(subset)
    sets = [arg for k, v in SMALL_RIB.items() for arg in ("--set", f"{k}={json.dumps(v)}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rib_core.cli", "rib", str(classifier), str(subset), str(work / "cli"),
                    "--companions", str(demo.root / "train.jsonl"),
                    "--device", "cpu", "--quiet", *sets], check=True, env=env, capture_output=True)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 1), "images_per_hour": round(n / seconds * 3600)}


if __name__ == "__main__":
    main()
