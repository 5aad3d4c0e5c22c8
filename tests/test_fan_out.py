"""A large job's chunks are not all queued by the request (issue 23): the request sends a bounded
number itself (FAN_OUT_INLINE); the rest go with the next advance of the job (a finishing chunk's,
or the reaper's, in a worker), each once, those already counted not at all. Counted on the real
broker (a private redis-server), not timed."""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator

import pytest
import redis

from contract.records import Records
from contract.stages import Send
from contract.tasks import FAN_OUT_INLINE, TaskQueue
from tests.api_inprocess import Api, inprocess_api

CLASSES = ["cat", "dog"]
IMAGES = FAN_OUT_INLINE * 2 + 37  # chunk size 2: 64 chunks inline, the rest (69 chunks) by the next advance


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with inprocess_api(tmp_path_factory.mktemp("redis"), CLASSES, ["k"], chunk_size=2) as api:
        yield api


def messages(broker: redis.Redis, queue: str) -> list[dict]:
    return [json.loads(m) for m in broker.lrange(queue, 0, -1)]


def test_a_large_job_is_answered_before_its_chunks_are_queued(api: Api) -> None:
    images = [{"id": f"i{n}", "image": f"s3://rib/data/i{n}.png", "labels": ["cat"]} for n in range(IMAGES)]
    r = api.post("/v1/jobs", json={"images": images})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    broker = redis.Redis.from_url(f"{api.redis_url}/0")
    sent = messages(broker, api.settings.image_queue)
    assert [m["headers"]["task"] for m in sent] == ["rib.process_chunk"] * FAN_OUT_INLINE
    chunks = sorted(ast.literal_eval(m["headers"]["argsrepr"]) for m in sent)
    assert chunks == [[job_id, n] for n in range(FAN_OUT_INLINE)]
    broker.delete(api.settings.image_queue)
    # The next advance, as a worker makes it; the last chunk, finished meanwhile, is not queued again.
    store = api.client.app.state.clients.store  # type: ignore[attr-defined]
    storage = api.client.app.state.clients.storage  # type: ignore[attr-defined]
    spec = store.read_spec(job_id, Records(storage, api.settings.signing_key()))
    last = len(spec.chunks) - 1
    assert store.begin(job_id, f"i{IMAGES - 1}", 3) == "run"
    store.mark_done(job_id, f"i{IMAGES - 1}", ["meta.json"], 1.0)
    assert store.count_chunk(job_id, spec, Send("images", last), {}, storage) == 0
    TaskQueue(api.settings).send_pipeline(job_id, store.advance(job_id, spec, api.settings.visibility_timeout_s))
    queued = [ast.literal_eval(m["headers"]["argsrepr"])[1] for m in messages(broker, api.settings.image_queue)]
    assert sorted(queued) == list(range(FAN_OUT_INLINE, last))  # each once
    assert store.advance(job_id, spec, api.settings.visibility_timeout_s) == []
