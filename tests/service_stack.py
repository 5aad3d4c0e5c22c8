"""The real service stack for tests: a private redis-server, moto's S3 server, uvicorn and Celery workers.

Each piece is a real process (moto runs in a thread of the test process) on a free loopback port,
so the tests exercise the same code paths as a deployment: HTTP, the Redis broker and
visibility timeout, S3 over HTTP, and worker processes that can be killed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import boto3
import httpx
import redis

from rib_core.datasets import Manifest, ManifestRecord

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], T | None], timeout: float, what: str, every: float = 0.25) -> T:
    """Poll ``check`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except (httpx.HTTPError, redis.RedisError, OSError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A private redis-server without persistence; yields its URL prefix (no db number)."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: redis.Redis(port=port).ping(), 20, "redis-server")
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server on a free loopback port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def s3(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def upload_dataset(client: Any, bucket: str, prefix: str, manifest: Manifest, name: str = "manifest.jsonl",
                   records: int | None = None, masks: bool = False) -> str:
    """Copy a manifest and its images (and masks) to S3, relative paths kept; returns the manifest's URI."""
    chosen = manifest.records[:records] if records else manifest.records
    for r in chosen:
        files = [(r.image, manifest.image_uri(r))] + ([(r.mask, manifest.mask_uri(r))] if masks else [])
        for key, path in files:
            client.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=Path(path).read_bytes())
    kept = [ManifestRecord(r.id, r.image, r.labels, r.mask if masks else None) for r in chosen]
    sub = Manifest(manifest.classes, kept, manifest.base)
    client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=sub.dumps().encode())
    return f"s3://{bucket}/{prefix}/{name}"


class Process:
    """A child process with its output in a log file; killable as a whole process group."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = log.open("ab")
        self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=self._fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def kill(self) -> None:
        """SIGKILL, no chance to clean up: what a crashed machine looks like to the broker."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._fh.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._fh.close()

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]


def start_api(env: dict[str, str], log: Path) -> tuple[Process, str]:
    port = free_port()
    proc = Process([str(BIN / "uvicorn"), "service.main:app", "--host", "127.0.0.1", "--port", str(port)], env, log)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, f"uvicorn ({log})")
    return proc, url


def start_worker(env: dict[str, str], log: Path, queue: str, name: str) -> Process:
    """A Celery worker, solo pool (one process: SIGKILL takes the running task with it)."""
    return Process([str(BIN / "celery"), "-A", "worker.celery_app", "worker", "-Q", queue, "--pool", "solo",
                    "--concurrency", "1", "--prefetch-multiplier", "1", "-n", f"{name}@%h", "--loglevel", "INFO",
                    "--without-gossip", "--without-mingle"], env, log)
