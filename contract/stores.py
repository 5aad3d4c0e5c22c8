"""What every job store shares: job ids, owners, waiting out a Redis outage, whether a job is known,
and the leases that let one delivery of a unit (a stage, a chunk) run at a time.

A job's record is a Redis hash, ``<prefix>:<id>``, with an ``owner`` field (:func:`owner_of` the
API key that made it); its other keys are ``<prefix>:<id>:<part>``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

JOB_ID = re.compile(r"[0-9a-f]{32}")
OUTAGES = (RedisConnectionError, RedisTimeoutError, BusyLoadingError)
T = TypeVar("T")


def owner_of(api_key: str) -> str:
    """What a job stores of the key that made it: a SHA-256 digest, never the key."""
    return hashlib.sha256(api_key.encode()).hexdigest()


class RedisJobs:
    """The part of a job store every kind of job shares. ``prefix``: the Redis namespace of its
    records; ``patience_s``: how long a call waits out a Redis outage (the workers wait; the API
    answers 503 at once)."""

    def __init__(self, client: redis.Redis, prefix: str, ttl_s: int = 7 * 24 * 3600,
                 patience_s: float = 0.0) -> None:
        self.r = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.patience_s = patience_s

    def key(self, job_id: str, part: str = "") -> str:
        return f"{self.prefix}:{job_id}" + (f":{part}" if part else "")

    def _call(self, fn: Callable[[], T]) -> T:
        """``fn()``, retried through a Redis outage for up to ``patience_s``."""
        deadline, pause = time.monotonic() + self.patience_s, 0.5
        while True:
            try:
                return fn()
            except OUTAGES:
                if time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)
                pause = min(2 * pause, 15.0)

    def exists(self, job_id: str, owner: str | None = None) -> bool:
        """Whether the job is known (and, given an ``owner``, belongs to it: a job without one belongs to nobody)."""
        if not JOB_ID.fullmatch(job_id):
            return False
        if owner is None:
            return bool(self._call(lambda: self.r.exists(self.key(job_id))))
        found = self._call(lambda: self.r.hget(self.key(job_id), "owner"))
        return found is not None and bool(owner) and hmac.compare_digest(found, owner)

    def rebuilding(self, job_id: str) -> bool:
        """Whether a process is rebuilding the job from storage right now (it is not in Redis yet)."""
        return bool(self._call(lambda: self.r.exists(self.key(job_id, "restoring")))) and not self.exists(job_id)

    def claim(self, job_id: str, unit: str, token: str, lease_s: float, take_over: bool = False) -> bool:
        """Hold the lease of ``unit`` (a stage, or a chunk) for ``token``; False while another holds it,
        unless ``take_over`` (the broker redelivered the message: the holder is dead)."""
        key = self.key(job_id, f"lease:{unit}")
        return bool(self._call(lambda: self.r.set(key, token, nx=not take_over, px=int(lease_s * 1000)))) or \
            self._call(lambda: self.r.get(key)) == token

    def renew(self, job_id: str, unit: str, token: str, lease_s: float) -> None:
        key = self.key(job_id, f"lease:{unit}")
        if self.r.get(key) == token:
            self.r.pexpire(key, int(lease_s * 1000))

    def release(self, job_id: str, unit: str, token: str) -> None:
        key = self.key(job_id, f"lease:{unit}")
        if self._call(lambda: self.r.get(key)) == token:
            self._call(lambda: self.r.delete(key))
