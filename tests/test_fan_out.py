"""A large job's chunks are queued by a task, not by the request (issue 23): the request sends a
bounded number itself and one fan-out task; the fan-out, run as a worker runs it, sends the rest,
skipping images already done. Counted on the real broker (a private redis-server), not timed."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
import redis

import worker.tasks as wt
from contract.jobs import JobStore
from contract.tasks import FAN_OUT_INLINE, TaskQueue
from tests.api_inprocess import Api, inprocess_api

CLASSES = ["cat", "dog"]
IMAGES = FAN_OUT_INLINE * 2 + 37  # chunk size 2: 64 chunks inline, the rest (69 chunks) by the fan-out


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with inprocess_api(tmp_path_factory.mktemp("redis"), CLASSES, ["k"], chunk_size=2) as api:
        yield api


def messages(broker: redis.Redis, queue: str) -> list[dict]:
    return [json.loads(m) for m in broker.lrange(queue, 0, -1)]


def test_a_large_job_is_answered_before_its_chunks_are_queued(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    images = [{"id": f"i{n}", "image": f"s3://rib/data/i{n}.png", "labels": ["cat"]} for n in range(IMAGES)]
    r = api.post("/v1/jobs", json={"images": images})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    broker = redis.Redis.from_url(f"{api.redis_url}/0")
    sent = messages(broker, api.settings.image_queue)
    tasks = [m["headers"]["task"] for m in sent]
    assert tasks.count("rib.process_chunk") == FAN_OUT_INLINE and tasks.count("rib.fan_out") == 1
    broker.delete(api.settings.image_queue)
    # The fan-out, as a worker runs it; one image finished meanwhile is not queued again.
    store = JobStore(redis.Redis.from_url(f"{api.redis_url}/0", decode_responses=True))
    store.begin(job_id, f"i{IMAGES - 1}")
    store.mark_done(job_id, f"i{IMAGES - 1}", ["meta.json"], 1.0)
    monkeypatch.setattr(wt, "runtime", lambda: wt.Runtime(api.settings, store, api.client.app.state.clients.storage))
    monkeypatch.setattr(wt, "task_queue", lambda: TaskQueue(api.settings))
    start = next(m for m in sent if m["headers"]["task"] == "rib.fan_out")["headers"]["argsrepr"]
    assert start == repr([job_id, FAN_OUT_INLINE * 2])
    wt.fan_out.apply(args=[job_id, FAN_OUT_INLINE * 2]).get()
    chunks = messages(broker, api.settings.image_queue)
    queued = [i["id"] for m in chunks for i in json.loads(base64.b64decode(m["body"]))[0][0]["items"]]
    assert sorted(queued) == sorted(f"i{n}" for n in range(FAN_OUT_INLINE * 2, IMAGES - 1))  # each once
