"""Every job reaches a terminal state, whatever happens to its workers, Redis or S3.

First the bookkeeping on a private redis-server (attempt bound, reaper, jobs Redis lost), the
thread count and the ``rib serve`` / ``rib worker`` commands. Then the fault-injection suite on the
real stack (tests.test_service's: redis-server with its append-only file, moto, uvicorn, a
prefork Celery worker): workers killed, Redis restarted, Redis emptied, S3 stalled, a chunk past
its hard time limit. In each, the job ends ``done`` or ``failed`` with every image accounted for:
complete results or a reason, none duplicated, none lost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis
import torch

from contract.job_kinds import IMAGE
from contract.job_requests import ImageJobSpec, JobItem, SubmittedManifest, load_request, request_items, save_request
from contract.pipelines import PipelineStore
from contract.records import Records, UntrustedRecordError
from contract.stages import Send
from rib_core.io.artifacts import MARKER, image_key, job_manifest_key, request_key
from rib_core.io.storage import LocalStorage
from rib_core.runtime.threads import available_cores, torch_threads
from tests.service_stack import StallingProxy, children, free_port, redis_server, wait_for
from tests.test_service import (
    BUCKET,
    Stack,
    all_results,
    check_artifacts,
    running_stack,
    size_of,
    wait_finished,
)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ bookkeeping


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PipelineStore]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield PipelineStore.from_url(f"{url}/0", ttl_s=600, kind=IMAGE)


def image_spec(items: list[JobItem], chunk_size: int = 2) -> ImageJobSpec:
    return ImageJobSpec("bulk", items, {"iterations": 2}, {}, chunk_size)


def new_job(store: PipelineStore, n: int) -> tuple[str, ImageJobSpec]:
    job_id = os.urandom(16).hex()
    spec = image_spec([JobItem(f"img{i}", f"s3://b/img{i}.png", ("cat",)) for i in range(n)])
    store.create(job_id, spec)
    return job_id, spec


def forget(store: PipelineStore, job_id: str) -> None:
    """What a Redis restart without persistence (or an eviction) does to a job."""
    store.r.delete(*store.r.keys(f"rib:job:{job_id}*"))


def test_a_worker_finishing_after_redis_lost_the_job_recreates_nothing(store: PipelineStore) -> None:
    job_id, _ = new_job(store, 2)
    assert store.begin(job_id, "img0", 3) == "run" and store.begin(job_id, "img1", 3) == "run"
    forget(store, job_id)
    assert store.mark_done(job_id, "img0", ["meta.json"], 1.0) is False
    assert store.mark_failed(job_id, "img1", "boom") is False
    assert store.give_up(job_id, ["img1"], "lost", 3) == 0
    assert store.chunk_done(job_id, Send("images", 0), {}, 1) == -1
    assert not store.exists(job_id) and store.r.keys(f"rib:job:{job_id}*") == []
    assert store.begin(job_id, "img0", 3) == "missing"


def test_a_failure_never_overrides_a_success(store: PipelineStore) -> None:
    job_id, _ = new_job(store, 1)
    store.begin(job_id, "img0", 3)
    store.mark_done(job_id, "img0", ["meta.json"], 1.0)
    assert store.mark_failed(job_id, "img0", "a late duplicate failed") is False
    assert store.give_up(job_id, ["img0"], "its chunk died", 3) == 0
    assert store.status(job_id)["counts"] == {"running": 0, "done": 1, "failed": 0, "skipped": 0, "queued": 0}


def test_an_image_its_worker_died_on_every_attempt_fails_alone(store: PipelineStore) -> None:
    """A poison image (one that kills its worker: out of memory, a crash in a native library) is
    failed once its own attempts are spent; its chunk's other images still run."""
    job_id, _ = new_job(store, 3)  # chunks [img0, img1] and [img2]
    send = Send("images", 0)
    for _ in range(2):  # two deliveries, each killed while on img0
        assert store.start(job_id, send, max_attempts=2 * 2 + 1) == "run"
        assert store.begin(job_id, "img0", 2) == "run"
    assert store.start(job_id, send, max_attempts=2 * 2 + 1) == "run"  # the chunk is not dead-lettered ...
    assert store.begin(job_id, "img0", 2) == "exhausted"                # ... the image is
    assert store.begin(job_id, "img1", 2) == "run"                      # and the rest of the chunk runs
    assert store.items(job_id)[0]["attempts"] == 2 and store.items(job_id)[1]["attempts"] == 1


def test_a_chunk_whose_deliveries_all_died_fails_its_images_with_the_reason(store: PipelineStore) -> None:
    job_id, _ = new_job(store, 3)  # chunks [img0, img1] and [img2]
    send = Send("images", 0)
    assert store.begin(job_id, "img2", 3) == "run"
    store.mark_done(job_id, "img2", ["meta.json"], 1.0)
    for _ in range(2):  # two deliveries, each killed at its hard time limit while on img0
        assert store.start(job_id, send, max_attempts=2) == "run"
        assert store.begin(job_id, "img0", 3) == "run"
        store.note_lost(job_id, send, "exceeded the chunk time limit (RIB_CHUNK_TIME_LIMIT_S=9 s)")
    assert store.start(job_id, send, max_attempts=2) == "dead"  # the third is dead-lettered
    assert store.give_up(job_id, ["img0", "img1"], store.lost_reason(job_id, send, 2), 2) == 2
    status = store.status(job_id)
    assert status["state"] == "done" and status["counts"]["failed"] == 2 and status["counts"]["running"] == 0
    reason = "exceeded the chunk time limit (RIB_CHUNK_TIME_LIMIT_S=9 s) after 2 attempts"
    assert status["errors"] == [{"id": "img0", "error": reason}, {"id": "img1", "error": reason}]
    assert [i["attempts"] for i in store.items(job_id)] == [2, 2, 1]  # each charged the chunk's attempts
    assert store.lost_reason(job_id, Send("images", 1), 3).startswith("its worker stopped before finishing it")


def test_the_reaper_sends_a_chunk_whose_worker_died_again_then_dead_letters_it(store: PipelineStore) -> None:
    job_id, spec = new_job(store, 3)
    assert job_id in store.r.smembers(IMAGE.active_key)
    first, second = Send("images", 0), Send("images", 1)
    assert store.advance(job_id, spec, dead_after_s=60) == [first, second]  # every chunk, once
    assert store.advance(job_id, spec, dead_after_s=60) == []
    assert store.claim(job_id, first.unit, "worker-a", lease_s=0.2)  # its worker dies: the lease runs out
    assert store.claim(job_id, second.unit, "worker-b", lease_s=60)  # alive: never handed out again
    for _ in range(2):
        assert store.start(job_id, first, max_attempts=2) == "run" and store.start(job_id, second, 2) == "run"
        assert store.begin(job_id, "img0", 3) == "run"
        assert store.advance(job_id, spec, dead_after_s=60) == []  # its lease still holds
        time.sleep(0.3)
        assert store.advance(job_id, spec, dead_after_s=60) == [first]  # sent again, once
        assert store.advance(job_id, spec, dead_after_s=60) == []
        assert store.items(job_id)[0]["status"] == "running"  # until its next delivery runs it
        assert store.claim(job_id, first.unit, "worker-c", lease_s=0.2)
    assert store.start(job_id, first, max_attempts=2) == "dead"
    assert store.give_up(job_id, ["img0", "img1"], store.lost_reason(job_id, first, 2), 2) == 2
    assert store.items(job_id)[0]["status"] == "failed"
    assert "stopped before finishing it" in store.items(job_id)[0]["error"]
    assert "after 2 attempts" in store.items(job_id)[0]["error"]
    assert store.items(job_id)[2]["status"] == "queued"


def test_a_job_redis_lost_is_rebuilt_from_storage(store: PipelineStore, tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    records = Records(storage, b"the server's secret")
    job_id = os.urandom(16).hex()
    items = [JobItem(f"img{i}", f"s3://b/img{i}.png", ("cat",)) for i in range(3)]
    spec = image_spec(items)
    save_request(records, job_id, spec)
    planted = os.urandom(16).hex()  # a request.json the service did not write is never adopted
    storage.put(request_key(planted), json.dumps({**load_request(records, job_id), "job_id": planted}).encode())
    assert store.restore(planted, records) is None and not store.exists(planted)
    store.create(job_id, spec)
    for name in ("map.npz", MARKER):  # img0 finished; img1 was cut off before its marker
        storage.put(image_key(job_id, "img0", name), b"x")
    storage.put(image_key(job_id, "img1", "map.npz"), b"x")
    forget(store, job_id)
    assert store.restore(os.urandom(16).hex(), records) is None  # storage has no such job
    assert store.restore(job_id, records) == spec
    assert store.restore(job_id, records) is None and not store.rebuilding(job_id)  # rebuilt once
    status = store.status(job_id)
    assert status["counts"] == {"running": 0, "done": 1, "failed": 0, "skipped": 0, "queued": 2}
    assert store.items(job_id)[0]["artifacts"] == ["map.npz", MARKER]
    assert status["rib"] == {"iterations": 2}
    assert store.advance(job_id, spec, dead_after_s=60) == [Send("images", 0), Send("images", 1)]  # queued again


def test_a_manifest_job_is_rebuilt_from_its_frozen_manifest(store: PipelineStore, tmp_path: Path) -> None:
    """A bulk job from a manifest keeps the manifest's bytes (digest signed in request.json), not its
    items re-encoded; the rebuild reads them back, and refuses a copy changed since."""
    storage = LocalStorage(tmp_path)
    records = Records(storage, b"the server's secret")
    text = "\n".join(['{"format": "rib-manifest", "version": 1, "classes": ["cat", "dog"]}',
                      '{"id": "a", "image": "a.jpg", "labels": ["cat"]}',
                      '{"id": "b", "image": "s3://other/b.jpg", "labels": ["dog", "cat"]}']) + "\n"
    manifest = SubmittedManifest(text, "s3://b/set", ("cat", "dog"))
    items = manifest.items()
    assert items == [JobItem("a", "s3://b/set/a.jpg", ("cat",)), JobItem("b", "s3://other/b.jpg", ("dog", "cat"))]
    job_id = os.urandom(16).hex()
    save_request(records, job_id, image_spec(items), manifest=manifest)
    request = load_request(records, job_id)
    assert "items" not in request and request_items(records, request) == items
    restored = store.restore(job_id, records)
    assert restored is not None and restored.items == items  # nothing finished: every image is queued again
    assert [it["id"] for it in store.items(job_id)] == ["a", "b"]
    changed = os.urandom(16).hex()
    save_request(records, changed, image_spec(items), manifest=manifest)
    storage.put(job_manifest_key(changed), text.replace("dog", "cat").encode())
    with pytest.raises(UntrustedRecordError):
        request_items(records, load_request(records, changed))
    assert store.restore(changed, records) is None and not store.exists(changed)


# ------------------------------------------------------------------------------------ threads and commands


def test_torch_threads_come_from_the_cores_this_process_has(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert torch_threads(None, 1) == 1 and torch_threads(2, 1) == 2  # an explicit count wins
    monkeypatch.delenv("OMP_NUM_THREADS")
    cores = available_cores()
    assert cores == len(os.sched_getaffinity(0))
    assert torch_threads(None, 1) == cores and torch_threads(None, 4 * cores) == 1 and torch_threads(3, 8) == 3
    from worker.tasks import set_pool_torch_threads, set_torch_threads

    before = torch.get_num_threads()
    try:
        set_torch_threads(SimpleNamespace(concurrency=cores))  # the worker's main process
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        set_pool_torch_threads()  # a pool process applies the same count
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.heavy  # starts processes
def test_rib_serve_and_rib_worker_run_without_the_venv_on_path(tmp_path: Path) -> None:
    with redis_server(tmp_path) as url:
        port = free_port()
        env = {**os.environ, "PATH": "/nonexistent", "PYTHONPATH": str(ROOT), "RIB_STORAGE_URI": str(tmp_path),
               "RIB_BROKER_URL": f"{url}/0", "RIB_RESULT_BACKEND": f"{url}/1", "RIB_IMAGE_QUEUE": "custom.images",
               "RIB_TRAINING_QUEUE": "custom.training", "OMP_NUM_THREADS": "1"}
        rib = [sys.executable, "-m", "rib_core.cli"]
        serve = subprocess.Popen([*rib, "serve", "--port", str(port)], env=env, cwd=tmp_path,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200, 300, "rib serve")
        finally:
            serve.terminate()
            serve.wait(30)
        for queue, flag in (("custom.images", []), ("custom.training", ["--training"])):
            worker = subprocess.Popen([*rib, "worker", *flag], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
            try:
                lines: list[str] = []  # Celery's startup banner lists the queues the worker consumes
                wait_for(lambda w=worker, out=lines: out.append(w.stdout.readline()) or "ready." in out[-1], 300,
                         f"rib worker ({queue})", every=0)
                assert any(f".> {queue}" in line for line in lines), "".join(lines)
            finally:
                worker.terminate()
                worker.wait(30)


# ------------------------------------------------------------------------------------ faults on the real stack

# Short lease and visibility timeout so that lost work comes back within seconds; the time limit
# is above any chunk of two small images, model load included.
FAULT_SETTINGS = {"RIB_LEASE_S": "8", "RIB_VISIBILITY_TIMEOUT_S": "40", "RIB_CHUNK_TIME_LIMIT_S": "30",
                  "RIB_MAX_ATTEMPTS": "3"}


@pytest.fixture(scope="module")
def faults(demo: Any, classifier_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(demo, classifier_path, tmp_path_factory.mktemp("fault-logs"), **FAULT_SETTINGS) as stack:
        stack.worker.stop()
        stack.new_worker("prefork-1", pool="prefork")
        yield stack


def submit(stack: Stack, first: int, n: int, rib: dict[str, Any] | None = None) -> str:
    images = [{"id": r.id, "image": f"s3://{BUCKET}/companions/{r.image}", "labels": list(r.labels)}
              for r in stack.train.records[first:first + n]]
    with stack.client() as c:
        r = c.post("/v1/jobs", json={"images": images, "rib": rib or {}})
        assert r.status_code == 202, r.text
        return r.json()["job_id"]


def wait_done_count(stack: Stack, job_id: str, n: int) -> None:
    with stack.client() as c:
        wait_for(lambda: c.get(f"/v1/jobs/{job_id}").json()["counts"]["done"] >= n, 300,
                 f"{n} images of job {job_id} done", every=0.2)


def accounted(stack: Stack, job_id: str, first: int, n: int, all_done: bool = False) -> list[dict[str, Any]]:
    """Wait for the job's end; check every image is done with all its files, or failed with a reason
    (with ``all_done``, done)."""
    records = stack.train.records[first:first + n]
    with stack.client() as c:
        status = wait_finished(c, job_id, timeout=400)
        items = all_results(c, job_id, 100)
    assert status["state"] in ("done", "failed"), (status, stack.worker.tail())
    counts = status["counts"]
    assert counts["queued"] == counts["running"] == counts["skipped"] == 0 and counts["done"] + counts["failed"] == n
    assert [i["id"] for i in items] == [r.id for r in records]
    assert not all_done or counts["done"] == n, items
    for item, record in zip(items, records, strict=True):
        if item["status"] == "done":
            check_artifacts(stack, item, list(record.labels), size_of(stack.train, record))
        else:
            assert item["status"] == "failed" and item["error"], item
    keys = stack.objects(f"results/jobs/{job_id}/images/")
    assert len(keys) == len(set(keys))
    index = json.loads(stack.get(f"results/jobs/{job_id}/index.json"))
    assert index["counts"] == counts and [i["id"] for i in index["images"]] == [r.id for r in records]
    return items


def pool_child(stack: Stack) -> int:
    return wait_for(lambda: children(stack.worker.proc.pid), 60, "the worker's pool process")[0]


@pytest.mark.slow
def test_worker_child_and_main_process_killed_three_times_during_one_job(faults: Stack) -> None:
    job_id = submit(faults, 40, 10)
    wait_done_count(faults, job_id, 1)
    os.kill(pool_child(faults), signal.SIGKILL)  # Celery requeues the chunk (worker lost)
    wait_done_count(faults, job_id, 3)
    faults.worker.kill()  # main and child: the chunk stays unacknowledged, the reaper and Redis bring it back
    faults.new_worker("prefork-2", pool="prefork")
    wait_done_count(faults, job_id, 5)
    os.kill(pool_child(faults), signal.SIGKILL)
    accounted(faults, job_id, 40, 10, all_done=True)


@pytest.mark.slow
def test_redis_restarted_mid_job(faults: Stack) -> None:
    job_id = submit(faults, 50, 6)
    wait_done_count(faults, job_id, 2)
    faults.redis.stop()
    with faults.client() as c:
        assert c.get(f"/v1/jobs/{job_id}").status_code == 503  # said plainly, not a crash
    time.sleep(3)
    faults.redis.start()  # the same port, its append-only file
    accounted(faults, job_id, 50, 6, all_done=True)


@pytest.mark.slow
def test_a_job_redis_lost_entirely_is_rebuilt_from_storage(faults: Stack) -> None:
    job_id = submit(faults, 60, 6)
    wait_done_count(faults, job_id, 2)
    # What a restart without persistence does to a job: its state and its queued chunks are gone. (Not
    # FLUSHALL: that also drops kombu's queue bindings, a broker set-up matter this test leaves out.)
    r = redis.Redis.from_url(f"{faults.redis_url}/0")
    r.delete("rib.images", "unacked", "unacked_index", *r.keys("rib:*"))
    accounted(faults, job_id, 60, 6, all_done=True)


@pytest.mark.slow
def test_s3_stalled_past_the_chunk_time_limit(faults: Stack) -> None:
    proxy = StallingProxy(int(faults.endpoint.rsplit(":", 1)[1]))
    faults.worker.stop()
    faults.new_worker("prefork-s3", pool="prefork", RIB_S3_ENDPOINT_URL=proxy.url, RIB_CHUNK_TIME_LIMIT_S="20",
                      AWS_ENDPOINT_URL=proxy.url)
    try:
        job_id = submit(faults, 70, 4)
        wait_done_count(faults, job_id, 1)
        proxy.flowing.clear()  # S3 answers nothing for longer than the chunk time limit
        time.sleep(25)
        proxy.flowing.set()
        accounted(faults, job_id, 70, 4)
        assert "Hard time limit (20s) exceeded" in faults.worker.tail(100_000)
    finally:
        faults.worker.stop()
        faults.new_worker("prefork-3", pool="prefork")
        proxy.close()


@pytest.mark.slow
def test_a_chunk_past_its_hard_time_limit_fails_its_images_with_the_reason(faults: Stack) -> None:
    faults.worker.stop()
    faults.new_worker("prefork-tl", pool="prefork", RIB_CHUNK_TIME_LIMIT_S="10", RIB_MAX_ATTEMPTS="2")
    heavy = {"iterations": 100, "companions": 8, "crop_size": 128, "margin": 1e9}  # minutes per image here
    try:
        job_id = submit(faults, 80, 2, heavy)
        items = accounted(faults, job_id, 80, 2)
    finally:
        faults.worker.stop()
        faults.new_worker("prefork-4", pool="prefork")
    assert [i["status"] for i in items] == ["failed", "failed"]
    for item in items:
        assert item["error"] == "exceeded the chunk time limit (RIB_CHUNK_TIME_LIMIT_S=10 s) after 2 attempts"
        assert item["attempts"] == 2 and item["artifacts"] == {}
