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
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import boto3
import httpx
import redis
import uvicorn

from rib_core.data.datasets import Manifest, ManifestRecord

ROOT = Path(__file__).resolve().parents[1]
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


class RedisServer:
    """A private redis-server with the persistence the project documents (an append-only file,
    fsync every second), on a fixed port so that it can be stopped and started again."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"  # no db number
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                                      "--dir", str(self.workdir)], stdout=subprocess.DEVNULL)
        wait_for(lambda: redis.Redis(port=self.port).ping(), 20, "redis-server")

    def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file and exits, as on a restart."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A private redis-server (``RedisServer``); yields its URL prefix (no db number)."""
    server = RedisServer(workdir)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


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
    proc = Process([sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port", str(port)],
                   env, log)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, f"uvicorn ({log})")
    return proc, url


@contextmanager
def served(app: Any) -> Iterator[str]:
    """``app`` (an ASGI app already started, e.g. by a TestClient) under uvicorn in a thread of this
    process, for clients that need a real URL (a browser, a subprocess); yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or None, 30, "uvicorn")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def start_worker(env: dict[str, str], log: Path, queue: str, name: str, pool: str = "solo") -> Process:
    """A Celery worker running one task at a time. The solo pool is one process (SIGKILL takes the
    running task with it); the prefork pool has a main process and one child, and enforces
    ``RIB_CHUNK_TIME_LIMIT_S``."""
    return Process([sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", queue,
                    "--pool", pool, "--concurrency", "1", "--prefetch-multiplier", "1", "-n", f"{name}@%h",
                    "--loglevel", "INFO", "--without-gossip", "--without-mingle"], env, log)


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


class StallingProxy:
    """A TCP proxy in front of a server that can stop forwarding bytes: a real stall of that server,
    as a client sees it (connections open, nothing answers), without touching the server."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.flowing = threading.Event()
        self.flowing.set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self.flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.flowing.set()
        self._listener.close()
