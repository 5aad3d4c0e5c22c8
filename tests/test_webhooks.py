"""Webhooks (contract.webhooks): the allow-list, the signature, the outbox on a real redis-server with a
real HTTP receiver (a thread with http.server on 127.0.0.1) that is down first and up later, the API's
checks at submit, and one upload on the real stack (uvicorn + a Celery worker) whose final state
arrives signed at the receiver.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from contract.job_kinds import IMAGE
from contract.job_requests import ImageJobSpec, JobItem, load_request
from contract.pipelines import PipelineStore
from contract.records import Records
from contract.settings import Settings
from contract.stages import Send
from contract.stores import owner_of
from contract.webhooks import DELIVERIES, OUTBOX, callback_error, deliver_due, sign, signing_secret, verify
from rib_core.data.demo_data import DemoDataset
from rib_core.io.storage import LocalStorage
from tests.api_inprocess import inprocess_api
from tests.service_stack import free_port, redis_server, wait_for
from tests.test_service import API_KEY, running_stack, wait_finished

SECRET = "server-secret-for-tests"


class Receiver:
    """An HTTP receiver on 127.0.0.1:``port`` that records every POST (headers, raw body) and answers
    ``status``."""

    def __init__(self, port: int, status: int = 204) -> None:
        self.port = port
        self.status = status
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(free_port())
    yield r
    r.close()


def test_callback_urls_are_checked_against_the_allow_list() -> None:
    assert "http:// or https://" in callback_error("ftp://127.0.0.1/x", ["*"])
    assert "RIB_WEBHOOK_ALLOWED_HOSTS is empty" in callback_error("http://127.0.0.1/x", [])
    assert "credentials" in callback_error("http://user:pw@127.0.0.1/x", ["127.0.0.1"])
    # "*" is any public host: loopback and private addresses are refused, however they are named.
    for url in ("http://127.0.0.1:8000/x", "http://localhost/x", "http://10.1.2.3/x", "http://192.168.0.7/x",
                "http://169.254.169.254/latest", "http://[::1]/x"):
        assert "private or loopback" in callback_error(url, ["*"]), url
    assert callback_error("https://93.184.216.34/hook", ["*"]) is None
    # Listed hosts, addresses and ranges are allowed, private or not; nothing else is.
    assert callback_error("http://127.0.0.1:8000/x", ["127.0.0.1"]) is None
    assert callback_error("http://localhost:8000/x", ["localhost"]) is None
    assert callback_error("http://10.1.2.3/x", ["10.0.0.0/8"]) is None
    assert "not in RIB_WEBHOOK_ALLOWED_HOSTS" in callback_error("http://10.1.2.3/x", ["10.9.0.0/16"])
    assert "not in RIB_WEBHOOK_ALLOWED_HOSTS" in callback_error("https://93.184.216.34/x", ["hooks.example.com"])
    assert "cannot be resolved" in callback_error("http://no-such-host.invalid/x", ["*"])


def test_signatures_bind_the_body_the_timestamp_and_the_key() -> None:
    mine, other = signing_secret(SECRET, owner_of("key-a")), signing_secret(SECRET, owner_of("key-b"))
    assert mine != other and mine != signing_secret("another-server", owner_of("key-a"))
    body, now = b'{"job_id": "x", "state": "done"}', int(time.time())
    signature = sign(mine, now, body)
    assert verify(mine, str(now), body, signature)
    assert not verify(other, str(now), body, signature)                            # another key's secret
    assert not verify(mine, str(now), body.replace(b"done", b"failed"), signature)  # a changed body
    assert not verify(mine, str(now + 1), body, signature)                          # a changed timestamp
    assert not verify(mine, str(now - 3600), body, sign(mine, now - 3600, body))    # an old delivery replayed
    assert not verify(mine, "soon", body, signature)


def finished_job(store: PipelineStore, storage: LocalStorage, url: str, owner: str) -> tuple[str, ImageJobSpec]:
    """A one-image job with a callback, its image failed: its chunk counted, the job ended (what the
    worker's next advance does), so its callback is queued."""
    job_id = f"{int(time.time() * 1e6):032x}"
    spec = ImageJobSpec("upload", [JobItem("a", "s3://rib/a.png", ("digit1",))], {}, {}, 8, owner, url)
    store.create(job_id, spec)
    assert store.begin(job_id, "a", 3) == "run"
    store.mark_failed(job_id, "a", "boom")
    assert store.count_chunk(job_id, spec, Send("images", 0), {}, storage) == 1
    assert store.advance(job_id, spec, 60) == []
    return job_id, spec


def test_a_finished_job_is_posted_once_signed_and_retried_until_the_receiver_is_up(tmp_path: Path) -> None:
    settings = Settings(webhook_secret=SECRET, webhook_allowed_hosts=["127.0.0.1"], webhook_retry_s=[5, 30])
    storage = LocalStorage(tmp_path / "results")
    port = free_port()  # the receiver is down: nothing listens there yet
    owner = owner_of("key-a")
    with redis_server(tmp_path) as url:
        store = PipelineStore(redis.Redis.from_url(f"{url}/2", decode_responses=True), kind=IMAGE)
        r = store.r
        job_id, spec = finished_job(store, storage, f"http://127.0.0.1:{port}/hook", owner)
        assert store.advance(job_id, spec, 60) == []  # ended again (another worker, the reaper): still one delivery
        store.cancel(job_id, storage)  # a cancel after the end: nothing more
        assert r.zcard(OUTBOX) == 1 and r.hlen(DELIVERIES) == 1
        t0 = time.time()
        assert deliver_due(r, settings, now=t0) == 0
        record = json.loads(r.hget(DELIVERIES, f"image:{job_id}"))
        assert record["attempts"] == 1 and "ConnectError" in record["last_error"]
        assert r.zscore(OUTBOX, f"image:{job_id}") == pytest.approx(t0 + 5)  # the first countdown
        assert deliver_due(r, settings, now=t0 + 4) == 0  # not due yet: not attempted
        assert json.loads(r.hget(DELIVERIES, f"image:{job_id}"))["attempts"] == 1
        receiver = Receiver(port)  # the receiver comes up
        try:
            assert deliver_due(r, settings, now=t0 + 5) == 1
            assert deliver_due(r, settings, now=t0 + 1000) == 0  # delivered: nothing left
        finally:
            receiver.close()
        assert r.zcard(OUTBOX) == 0 and r.hlen(DELIVERIES) == 0
        [(headers, body)] = receiver.requests
        secret = signing_secret(SECRET, owner)
        assert verify(secret, headers["x-rib-timestamp"], body, headers["x-rib-signature"])
        assert not verify(signing_secret(SECRET, owner_of("key-b")), headers["x-rib-timestamp"], body,
                          headers["x-rib-signature"])  # a receiver with another key's secret refuses it
        assert headers["x-rib-delivery"] == f"image:{job_id}" and headers["x-rib-event"] == "job.finished"
        sent = json.loads(body)
        assert sent["job_id"] == job_id and sent["state"] == "failed" == store.status(job_id)["state"]
        assert sent["job"]["errors"] == [{"id": "a", "error": "boom"}] and sent["job"]["kind"] == "upload"

        # A receiver that keeps failing gets the first attempt and one per countdown, then the delivery is dropped.
        failing = Receiver(free_port(), status=500)
        try:
            job_id, _ = finished_job(store, storage, failing.url, owner)
            t1 = time.time()
            for now in (t1, t1 + 5, t1 + 35):
                assert deliver_due(r, settings, now=now) == 0
        finally:
            failing.close()
        assert len(failing.requests) == 3 and r.zcard(OUTBOX) == 0 and r.hlen(DELIVERIES) == 0
        assert all(verify(secret, h["x-rib-timestamp"], b, h["x-rib-signature"]) for h, b in failing.requests)


def test_the_api_checks_callback_urls_at_submit(demo: DemoDataset, tmp_path: Path) -> None:
    record = demo.val.records[0]
    data = Path(demo.val.image_uri(record)).read_bytes()
    with inprocess_api(tmp_path, demo.train.classes, [API_KEY, "other-key"], webhook_secret=SECRET,
                       webhook_allowed_hosts=["127.0.0.1", "*"]) as api:
        def upload(callback: str) -> httpx.Response:
            return api.post("/v1/images", files={"file": ("a.png", data, "image/png")},
                            data={"labels": list(record.labels), "callback_url": callback})

        for callback, message in (("http://10.0.0.5/hook", "private or loopback"),
                                  ("file:///etc/passwd", "http:// or https://"),
                                  ("http://no-such-host.invalid/x", "cannot be resolved")):
            r = upload(callback)
            assert r.status_code == 422 and message in r.json()["detail"], r.text
        r = api.post("/v1/jobs", json={"images": [{"id": "a", "image": "s3://rib/a.png", "labels": ["digit1"]}],
                                       "callback_url": "http://10.0.0.5/hook"})
        assert r.status_code == 422 and "callback_url: " in r.json()["detail"], r.text
        r = upload("http://127.0.0.1:9/hook")
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        assert redis.Redis.from_url(f"{api.redis_url}/0").hget(f"rib:job:{job_id}", "callback_url") == \
            b"http://127.0.0.1:9/hook"
        records = Records(api.client.app.state.clients.storage, api.settings.signing_key())
        assert load_request(records, job_id)["callback_url"] == "http://127.0.0.1:9/hook"
        # Each key learns its own signing secret.
        for key in (API_KEY, "other-key"):
            r = api.get("/v1/webhooks/secret", key=key)
            assert r.status_code == 200 and r.json()["secret"] == signing_secret(SECRET, owner_of(key)), r.text
        assert api.client.get("/v1/webhooks/secret").status_code == 401
    (tmp_path / "off").mkdir()
    with inprocess_api(tmp_path / "off", demo.train.classes, [API_KEY]) as api:  # no RIB_WEBHOOK_SECRET
        r = api.post("/v1/images", files={"file": ("a.png", data, "image/png")},
                     data={"labels": list(record.labels), "callback_url": "http://127.0.0.1:9/hook"})
        assert r.status_code == 422 and "RIB_WEBHOOK_SECRET is not set" in r.json()["detail"], r.text
        assert api.get("/v1/webhooks/secret").status_code == 404


def test_an_upload_on_the_real_stack_calls_back_once_signed(demo: DemoDataset, classifier_path: Path,
                                                            tmp_path: Path, receiver: Receiver) -> None:
    record = max(demo.val.records, key=lambda r: len(r.labels))
    data = Path(demo.val.image_uri(record)).read_bytes()
    with running_stack(demo, classifier_path, tmp_path, RIB_WEBHOOK_SECRET=SECRET,
                       RIB_WEBHOOK_ALLOWED_HOSTS="127.0.0.1", RIB_WEBHOOK_RETRY_S="1,2") as stack, \
            stack.client() as c:
        r = c.post("/v1/images", files={"file": ("scene.png", data, "image/png")},
                   data={"labels": ",".join(record.labels), "callback_url": receiver.url})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        status = wait_finished(c, job_id)
        secret = c.get("/v1/webhooks/secret").json()["secret"]
        wait_for(lambda: receiver.requests, 60, "the callback")
        assert c.delete(f"/v1/jobs/{job_id}").status_code == 409  # finished; nothing finalizes it again
    [(headers, body)] = receiver.requests
    assert verify(secret, headers["x-rib-timestamp"], body, headers["x-rib-signature"])
    sent = json.loads(body)
    assert sent["job_id"] == job_id and sent["state"] == status["state"] == "done"
    assert sent["job"]["counts"] == status["counts"]
