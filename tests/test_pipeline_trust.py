"""Pipeline and training jobs one can trust (issue 22), on a private redis-server and moto's S3 server.

In-process: the API's checks and tenancy; the worker's pipeline tasks called in this process (their
Celery task functions, with the process's clients pointed at the test's Redis and S3) for the
faults: a stage that raises MemoryError, deliveries whose workers died, Redis restarted or wiped
mid-job. The stage runners are replaced only where a fault cannot be caused otherwise (an
out-of-memory stage); everything else is the real code on real services.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import worker.pipeline_tasks as pt
from contract.job_kinds import PIPELINE, TRAINING
from contract.pipelines import PipelineStore, Send
from contract.records import Records, UntrustedRecordError
from contract.stores import owner_of
from contract.tasks import TaskQueue
from rib_core.data.demo_data import DemoDataset
from rib_core.io.artifacts import PIPELINE_MANIFEST, PIPELINE_SPEC, pipeline_key
from tests.api_inprocess import Api, inprocess_api
from tests.service_stack import RedisServer, upload_dataset
from worker import staged
from worker.tasks import Runtime

KEY_A, KEY_B = "key-of-a", "key-of-b"
BUCKET = "rib"


@pytest.fixture(scope="module")
def api(demo: DemoDataset, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with inprocess_api(tmp_path_factory.mktemp("redis"), demo.train.classes, [KEY_A, KEY_B],
                       max_stage_attempts=3, chunk_size=2, webhook_secret="server-secret",
                       webhook_allowed_hosts=["127.0.0.1"]) as api:
        yield api


@pytest.fixture(scope="module")
def manifest(api: Api, demo: DemoDataset) -> str:
    return upload_dataset(api.s3, BUCKET, "trust", demo.train, records=6, masks=True)


def submit(api: Api, body: dict[str, Any], key: str = KEY_A) -> str:
    r = api.post("/v1/pipelines", key, json=body)
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def test_seventeen_bad_pipeline_requests_are_refused_naming_the_field(api: Api, demo: DemoDataset,
                                                                      manifest: str) -> None:
    classes = demo.train.classes
    header = {"format": "rib-manifest", "version": 1}
    line = json.dumps({"id": "x", "image": "images/x.png", "labels": [classes[0]]})

    def dataset(name: str, head: dict[str, Any], body: str = line) -> str:
        api.s3.put_object(Bucket=BUCKET, Key=f"trust/{name}", Body=f"{json.dumps(head)}\n{body}\n".encode())
        return f"s3://{BUCKET}/trust/{name}"

    outside_mask = json.dumps({"id": "x", "image": "images/x.png", "labels": [classes[0]],
                               "mask": "s3://elsewhere/x.png"})
    cases = [
        ({"classifier": {"init_weights": "/etc/passwd"}}, "classifier.init_weights"),
        ({"classifier": {"init_weights": "s3://elsewhere/w.pth"}}, "classifier.init_weights"),
        ({"refine": {"irn": {"init_weights": "/etc/passwd"}}}, "refine.irn.init_weights"),
        ({"refine": {"irn": {"init_weights": "s3://elsewhere/w.pth"}}}, "refine.irn.init_weights"),
        ({"deeplab": {"init_weights": "/etc/passwd"}}, "deeplab.init_weights"),
        ({"deeplab": {"init_weights": "s3://elsewhere/w.pth"}}, "deeplab.init_weights"),
        ({"classifier": {"arch": "resnet9000"}}, "arch"),
        ({"classifier": {"crop_size": 100_000}}, "crop_size"),
        ({"rib": {"crop_size": 100_000}}, "crop_size"),
        ({"classifier": {"epochs": 10**9}}, "epochs"),
        ({"deeplab": {"iterations": 10**12}}, "iterations"),
        ({"classifier": {"num_workers": 64}}, "num_workers"),
        ({"manifest_uri": dataset("300.jsonl", {**header, "classes": [f"c{i}" for i in range(300)]},
                                  json.dumps({"id": "x", "image": "images/x.png", "labels": ["c0"]}))},
         "at most 254"),
        ({"manifest_uri": dataset("empty.jsonl", {**header, "classes": [*classes, ""]})}, "printable"),
        ({"manifest_uri": dataset("newline.jsonl", {**header, "classes": [*classes, "a\nb"]})}, "printable"),
        ({"manifest_uri": dataset("mask.jsonl", {**header, "classes": classes}, outside_mask)}, "mask"),
        ({"classifier_uri": f"s3://{BUCKET}/trust/none.pth"}, "nothing at"),
        ({"val_manifest_uri": f"s3://{BUCKET}/trust/none.jsonl"}, "no manifest at"),
        ({"classifier": {"stop": "plateau"}}, "give val_manifest_uri"),
    ]
    for change, message in cases:
        r = api.post("/v1/pipelines", json={"manifest_uri": manifest, **change})
        assert r.status_code == 422, (change, r.text)
        assert message in r.text, (change, r.text)
    r = api.post("/v1/pipelines", json={"manifest_uri": manifest, "classifier": {"crop_size": 100_000}})
    assert r.json()["errors"] == [{"field": "crop_size", "error": "Input should be less than or equal to 1024"}]


def test_the_manifest_changed_after_submit_changes_nothing(api: Api, demo: DemoDataset, manifest: str) -> None:
    job = submit(api, {"manifest_uri": manifest, "classifier": {"batch_size": 2}, "refine": {"use_irn": False}})
    frozen_key = f"results/{pipeline_key(job, PIPELINE_MANIFEST)}"
    before = api.s3.get_object(Bucket=BUCKET, Key=frozen_key)["Body"].read().decode()
    original = api.s3.get_object(Bucket=BUCKET, Key="trust/manifest.jsonl")["Body"].read().decode()
    header, first, second, *rest = original.splitlines()
    a, b = json.loads(first), json.loads(second)
    a["image"], b["image"] = b["image"], "s3://other/evil.png"  # lines swapped, one pointing elsewhere
    swapped = "\n".join([header, json.dumps(a), json.dumps(b), *rest, '{"id": "a\\\\b", "image": "x"}'])
    api.s3.put_object(Bucket=BUCKET, Key="trust/manifest.jsonl", Body=swapped.encode())
    try:
        frozen = [json.loads(ln) for ln in before.splitlines()[1:]]
        assert frozen[0]["image"] == f"s3://{BUCKET}/trust/{demo.train.records[0].image}"  # absolute, as at submit
        assert [r["id"] for r in frozen] == [r.id for r in demo.train.records[:6]]
        # Every stage reads this copy, checked against the digest in the signed record.
        records = Records(api.client.app.state.clients.storage, api.settings.signing_key())
        spec = records.get(pipeline_key(job, PIPELINE_SPEC))
        assert records.get_frozen(pipeline_key(job, PIPELINE_MANIFEST), spec["manifest_sha256"]).decode() == before
        # The export reads it too: a 409 (no mask yet), never a 500 from the changed manifest.
        r = api.get(f"/v1/pipelines/{job}/export", params={"format": "coco"})
        assert r.status_code == 409 and "no" in r.json()["detail"], r.text
        api.s3.put_object(Bucket=BUCKET, Key=frozen_key, Body=swapped.encode())  # the copy itself tampered with
        with pytest.raises(UntrustedRecordError, match="changed after the job was submitted"):
            records.get_frozen(pipeline_key(job, PIPELINE_MANIFEST), spec["manifest_sha256"])
        assert api.get(f"/v1/pipelines/{job}/export", params={"format": "coco"}).status_code == 409
    finally:
        api.s3.put_object(Bucket=BUCKET, Key="trust/manifest.jsonl", Body=original.encode())


def test_key_b_can_neither_read_overwrite_nor_adopt_what_is_key_as(api: Api, manifest: str) -> None:
    job = submit(api, {"manifest_uri": manifest, "classifier": {"batch_size": 2}, "refine": {"use_irn": False}})
    theirs = f"s3://{BUCKET}/results/jobs/{job}/pipeline/classifier/classifier.pth"
    api.s3.put_object(Bucket=BUCKET, Key=f"results/jobs/{job}/pipeline/classifier/classifier.pth", Body=b"A's")
    for body in ({"manifest_uri": manifest, "classifier_uri": theirs},
                 {"manifest_uri": f"s3://{BUCKET}/results/jobs/{job}/pipeline/inputs/manifest.jsonl"},
                 {"manifest_uri": manifest, "deeplab": {"init_weights": theirs}}):
        r = api.post("/v1/pipelines", KEY_B, json=body)
        assert r.status_code == 422 and "inside the service's results" in r.text, (body, r.text)
    r = api.post("/v1/training-jobs", KEY_B, json={"kind": "predict", "manifest": manifest, "checkpoint": theirs})
    assert r.status_code == 422 and "inside the service's results" in r.text, r.text
    r = api.post("/v1/training-jobs", KEY_B, json={"kind": "train", "manifest": manifest,
                                                   "output": f"s3://{BUCKET}/results/jobs/{job}/pipeline/"})
    assert r.status_code == 422 and "output is chosen by the service" in r.text, r.text
    # A may read its own job's files; its training job writes only under that job's own prefix.
    assert api.post("/v1/pipelines", KEY_A, json={"manifest_uri": manifest, "classifier_uri": theirs,
                                                  "refine": {"use_irn": False}}).status_code == 202
    r = api.post("/v1/training-jobs", KEY_A, json={"kind": "predict", "manifest": manifest, "checkpoint": theirs})
    assert r.status_code == 202, r.text
    training = r.json()["job_id"]
    record = json.loads(api.s3.get_object(Bucket=BUCKET, Key=f"results/jobs/{training}/training/training.json")
                        ["Body"].read())
    assert record["payload"]["output"] == f"s3://{BUCKET}/results/jobs/{training}/training"
    # Records the service did not write are never adopted: planted, or A's with the owner changed.
    spec = json.loads(api.s3.get_object(Bucket=BUCKET, Key=f"results/{pipeline_key(job, PIPELINE_SPEC)}")
                      ["Body"].read())
    for planted, signature in (("f" * 32, None), ("e" * 32, spec["signature"])):
        body = {**spec, "owner": owner_of(KEY_B)}
        if signature is None:
            body.pop("signature")
        api.s3.put_object(Bucket=BUCKET, Key=f"results/{pipeline_key(planted, PIPELINE_SPEC)}",
                          Body=json.dumps(body).encode())
        assert api.get(f"/v1/pipelines/{planted}", KEY_B).status_code == 404
        assert api.get(f"/v1/pipelines/{planted}", KEY_A).status_code == 404
    assert api.get(f"/v1/pipelines/{job}", KEY_B).status_code == 404
    assert api.get(f"/v1/pipelines/{job}/results", KEY_B).status_code == 404
    assert api.get(f"/v1/training-jobs/{training}", KEY_B).status_code == 404


# ----------------------------------------------------------------------------- the worker's tasks, in-process


@pytest.fixture()
def worker(api: Api, monkeypatch: pytest.MonkeyPatch) -> pt.Pipelines:
    """The pipeline tasks' clients pointed at the test's Redis and S3 (as a worker process would have)."""
    settings = api.settings
    storage = api.client.app.state.clients.storage
    client = redis.Redis.from_url(f"{api.redis_url}/0", decode_responses=True)
    store = PipelineStore(client, settings.job_ttl_s, patience_s=30)
    pipes = pt.Pipelines(store, Records(storage, settings.signing_key()), TaskQueue(settings), settings)
    rt = Runtime(settings, client, storage)
    monkeypatch.setattr(staged, "pipes", lambda kind=PIPELINE: pipes)
    monkeypatch.setattr(pt, "runtime", lambda: rt)
    staged.frozen_text.cache_clear()
    return pipes


def run_task(task: Any, *args: Any) -> None:
    result = task.apply(args=list(args))
    assert result.successful(), result.traceback


def stage(api: Api, job: str, name: str) -> dict[str, Any]:
    return api.get(f"/v1/pipelines/{job}").json()["stages"][name]


def test_a_stage_out_of_memory_fails_its_job_and_the_worker_serves_on(api: Api, manifest: str, worker: pt.Pipelines,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_memory(*_: Any) -> dict[str, Any]:
        raise MemoryError("cannot allocate 112 GiB")

    monkeypatch.setitem(pt.RUNNERS, "classifier", out_of_memory)
    first = submit(api, {"manifest_uri": manifest, "classifier": {"batch_size": 2}, "refine": {"use_irn": False},
                         "callback_url": "http://127.0.0.1:9/hook"})
    run_task(pt.pipeline_stage, first, "classifier")  # returns: the task itself does not raise
    assert stage(api, first, "classifier")["state"] == "failed"
    assert "MemoryError: cannot allocate" in stage(api, first, "classifier")["error"]
    assert api.get(f"/v1/pipelines/{first}").json()["state"] == "failed"
    # Its callback is queued once, with the final state (contract.webhooks sends it).
    delivery = json.loads(worker.store.r.hget("rib:webhooks:delivery", f"pipeline:{first}"))
    assert json.loads(delivery["body"])["state"] == "failed" and delivery["url"] == "http://127.0.0.1:9/hook"
    monkeypatch.setitem(pt.RUNNERS, "classifier", lambda *_: {"val_map": 0.5})
    second = submit(api, {"manifest_uri": manifest, "classifier": {"batch_size": 2}, "refine": {"use_irn": False}})
    run_task(pt.pipeline_stage, second, "classifier")  # the same process serves the next job
    assert stage(api, second, "classifier")["state"] == "done"
    assert stage(api, second, "maps")["state"] == "pending"  # and what follows it was sent: its chunks
    assert worker.store.r.llen(api.settings.image_queue) >= 1


def test_a_unit_whose_deliveries_killed_their_workers_is_failed_not_run_again(api: Api, manifest: str,
                                                                              worker: pt.Pipelines) -> None:
    job = submit(api, {"manifest_uri": manifest, "classifier": {"batch_size": 2}, "refine": {"use_irn": False}})
    for _ in range(3):  # three deliveries that started, then their worker process was killed
        assert worker.store.start(job, Send("classifier"), 3) == "run"
    run_task(pt.pipeline_stage, job, "classifier")  # the fourth delivery: dead-lettered
    assert stage(api, job, "classifier")["state"] == "failed"
    assert "its worker stopped 3 times" in stage(api, job, "classifier")["error"]
    assert api.get(f"/v1/pipelines/{job}").json()["state"] == "failed"


def test_a_redis_restart_is_waited_out_by_a_chunks_count(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    store = PipelineStore(redis.Redis.from_url(f"{server.url}/0", decode_responses=True), 600, patience_s=60)
    from contract.stages import PipelineSpec

    spec = PipelineSpec(manifest="m", image_ids=["a", "b"], chunks=[["a"], ["b"]], owner="o")
    store.create("a" * 32, spec)
    assert store.chunk_done("a" * 32, Send("maps", 0), {}, 2) == 0
    server.stop()
    restart = threading.Timer(2.0, server.start)
    restart.start()
    try:
        assert store.chunk_done("a" * 32, Send("maps", 1), {}, 2) == 1  # waited for Redis, then completed the stage
        assert store.stage_state("a" * 32, "maps") == "done"
    finally:
        restart.join()
        server.stop()


def test_a_redis_wipe_during_maps_is_rebuilt_from_storage_and_finishes(api: Api, manifest: str,
                                                                       worker: pt.Pipelines) -> None:
    job = submit(api, {"manifest_uri": manifest, "classifier": {"batch_size": 2}, "refine": {"use_irn": False}})
    spec = worker.spec(job)
    worker.store.finish(job, "classifier", "done", {"val_map": 0.5})
    worker.records.storage.put(pipeline_key(job, "stages/classifier.json"), b'{"val_map": 0.5}')
    worker.store.count_chunk(job, spec, Send("maps", 0), {}, worker.records.storage)  # then Redis was wiped
    worker.store.r.flushall()
    assert not worker.store.exists(job)
    restored = worker.ensure(job)  # what the next task (or GET) that meets the job does
    assert restored is not None and worker.store.exists(job, owner_of(KEY_A))
    status = api.get(f"/v1/pipelines/{job}").json()
    assert status["stages"]["classifier"]["state"] == "done"
    assert status["stages"]["maps"]["progress"]["chunks_done"] == 1
    sent = worker.store.r.llen(api.settings.image_queue)
    assert sent == len(spec.chunks) - 1  # the chunks not done, sent again (the wipe lost their messages)
    for n in range(1, len(spec.chunks)):
        worker.store.count_chunk(job, spec, Send("maps", n), {}, worker.records.storage)
    assert api.get(f"/v1/pipelines/{job}").json()["stages"]["maps"]["state"] == "done"
    assert worker.records.storage.exists(pipeline_key(job, "stages/maps.json"))


def test_a_redis_wipe_during_a_stage_recreates_no_ownerless_record(api: Api, manifest: str,
                                                                   worker: pt.Pipelines) -> None:
    job = submit(api, {"manifest_uri": manifest, "classifier": {"batch_size": 2}, "refine": {"use_irn": False}})
    worker.store.r.flushall()
    worker.store.progress(job, "classifier", epoch=1, epochs=5)  # a running stage's progress write
    assert not worker.store.exists(job)  # not recreated without its owner
    r = api.get(f"/v1/pipelines/{job}")  # the owner's next poll rebuilds it from storage
    assert r.status_code == 200 and r.json()["state"] == "queued", r.text
    assert api.get(f"/v1/pipelines/{job}", KEY_B).status_code == 404
    assert worker.store.r.llen(api.settings.training_queue) >= 1  # the rebuild sent its first stage again


# ------------------------------------------------------------ training jobs: one stage, the same machine


@pytest.fixture()
def trainer(api: Api, worker: pt.Pipelines, monkeypatch: pytest.MonkeyPatch) -> pt.Pipelines:
    """The training job's tasks on the test's Redis and S3, beside the pipelines' (``worker``)."""
    trainings = pt.Pipelines(PipelineStore(worker.store.r, api.settings.job_ttl_s, 30, TRAINING), worker.records,
                             worker.queue, worker.settings)
    monkeypatch.setattr(staged, "pipes", lambda kind=PIPELINE: trainings if kind is TRAINING else worker)
    return trainings


def submit_training(api: Api, manifest: str, **extra: Any) -> str:
    r = api.post("/v1/training-jobs", KEY_A, json={"kind": "train", "manifest": manifest,
                                                   "config": {"arch": "resnet18"}, **extra})
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def test_a_training_job_out_of_memory_fails_with_the_reason_and_calls_back_once(
        api: Api, manifest: str, trainer: pt.Pipelines, monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_memory(*_: Any) -> dict[str, Any]:
        raise MemoryError("cannot allocate 112 GiB")

    monkeypatch.setitem(pt.RUNNERS, "training", out_of_memory)
    job = submit_training(api, manifest, callback_url="http://127.0.0.1:9/hook")
    assert api.get(f"/v1/training-jobs/{job}", KEY_A).json()["state"] == "queued"
    assert trainer.store.r.llen(api.settings.training_queue) >= 1  # its one stage was sent
    run_task(pt.training_job, job, "training")  # returns: the task itself does not raise
    status = api.get(f"/v1/training-jobs/{job}", KEY_A).json()
    assert status["state"] == "failed" and "MemoryError: cannot allocate" in status["error"], status
    assert status["spec"]["kind"] == "train" and status["spec"]["manifest"] == manifest
    delivery = json.loads(trainer.store.r.hget("rib:webhooks:delivery", f"training:{job}"))
    assert json.loads(delivery["body"])["state"] == "failed" and delivery["url"] == "http://127.0.0.1:9/hook"
    run_task(pt.training_job, job, "training")  # a redelivery of a finished job runs nothing
    assert api.get(f"/v1/training-jobs/{job}", KEY_A).json()["error"] == status["error"]


def test_a_training_job_whose_deliveries_killed_their_workers_is_failed_not_run_again(
        api: Api, manifest: str, trainer: pt.Pipelines, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []
    monkeypatch.setitem(pt.RUNNERS, "training", lambda *args: ran.append(args[1]) or {})
    job = submit_training(api, manifest)
    for _ in range(3):  # three deliveries that started, then their worker process was killed
        assert trainer.store.start(job, Send("training"), 3) == "run"
    run_task(pt.training_job, job, "training")  # the fourth delivery: dead-lettered
    status = api.get(f"/v1/training-jobs/{job}", KEY_A).json()
    assert status["state"] == "failed" and "its worker stopped 3 times" in status["error"] and not ran


def test_a_training_job_redis_lost_is_rebuilt_from_its_record_and_its_result_kept(
        api: Api, manifest: str, trainer: pt.Pipelines, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(pt.RUNNERS, "training", lambda *args: {"checkpoint": f"{args[2].output}/deeplab.pth"})
    job = submit_training(api, manifest)
    run_task(pt.training_job, job, "training")
    done = api.get(f"/v1/training-jobs/{job}", KEY_A).json()
    assert done["state"] == "done" and done["result"]["checkpoint"].endswith(f"/jobs/{job}/training/deeplab.pth")
    trainer.store.r.delete(*trainer.store.r.keys(f"rib:training:{job}*"))  # Redis lost the job
    assert api.get(f"/v1/training-jobs/{job}", KEY_B).status_code == 404
    again = api.get(f"/v1/training-jobs/{job}", KEY_A).json()  # rebuilt: its stored report means done
    assert (again["state"], again["result"], again["spec"]) == ("done", done["result"], done["spec"])
