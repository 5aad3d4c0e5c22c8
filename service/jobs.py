"""Job bookkeeping in Redis and the layout of results in storage, shared by the API and the workers.

A job is a list of images. Each image is in exactly one of: queued, running, done, failed,
skipped (cancelled before it started). The states are Redis sets and hashes keyed by image id, so
a task that runs twice (a worker killed and its chunk redelivered) moves an image into the same
set again and every count stays exact. The transitions that must not interleave with a
cancellation are Lua scripts, which Redis runs atomically.

Storage: ``jobs/<job>/images/<image_id>/<artifact>`` with ``meta.json`` written last (its
presence means the image is complete), uploads under ``jobs/<job>/uploads/<image_id>`` and the
job index in ``jobs/<job>/index.json``, written once every image is accounted for.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from rib_core.storage import Storage

MARKER = "meta.json"  # written last: an image is complete in storage when this exists
JOB_ID = re.compile(r"[0-9a-f]{32}")
STATS_KEY = "rib:stats"
_STATUS_SETS = ("running", "done", "skipped")

# begin: skip if the job is cancelled, do nothing if the image already finished, else mark running.
_BEGIN = """
local job, running, done, failed, skipped, attempts = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local id = ARGV[1]
if redis.call('EXISTS', job) == 0 then
  return 'missing'
end
if redis.call('SISMEMBER', done, id) == 1 or redis.call('HEXISTS', failed, id) == 1
   or redis.call('SISMEMBER', skipped, id) == 1 then
  return 'finished'
end
-- an image whose earlier attempt died mid-way counts as started: it is redone even after a cancel
if redis.call('HGET', job, 'cancelled') == '1' and redis.call('SISMEMBER', running, id) == 0 then
  redis.call('SADD', skipped, id)
  redis.call('HINCRBY', KEYS[7], 'images_skipped', 1)
  return 'skipped'
end
redis.call('SADD', running, id)
redis.call('HINCRBY', attempts, id, 1)
redis.call('HSETNX', job, 'started_at', ARGV[2])
return 'run'
"""

# cancel: flag the job and move every image that has not started to skipped, in one step.
_CANCEL = """
local job, order, running, done, failed, skipped = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
if redis.call('EXISTS', job) == 0 then return -1 end
redis.call('HSET', job, 'cancelled', '1')
local n = 0
for _, id in ipairs(redis.call('LRANGE', order, 0, -1)) do
  if redis.call('SISMEMBER', running, id) == 0 and redis.call('SISMEMBER', done, id) == 0
     and redis.call('HEXISTS', failed, id) == 0 and redis.call('SADD', skipped, id) == 1 then
    n = n + 1
  end
end
redis.call('HINCRBY', KEYS[7], 'images_skipped', n)
return n
"""


def owner_of(api_key: str) -> str:
    """What a job stores of the key that made it: a SHA-256 digest, never the key."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def image_key(job_id: str, image_id: str, name: str = "") -> str:
    """Storage key of an artifact (or, with no name, the folder) of one image of one job."""
    return Storage.check_key(f"jobs/{job_id}/images/{image_id}/{name}") + ("" if name else "/")


def upload_key(job_id: str, image_id: str) -> str:
    return Storage.check_key(f"jobs/{job_id}/uploads/{image_id}")


def index_key(job_id: str) -> str:
    return f"jobs/{job_id}/index.json"


@dataclass(frozen=True)
class JobItem:
    """One image of a job: where to read it and its class names."""

    id: str
    image: str
    labels: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "image": self.image, "labels": list(self.labels)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> JobItem:
        return cls(d["id"], d["image"], tuple(d["labels"]))


def job_state(total: int, counts: dict[str, int], cancelled: bool) -> str:
    finished = counts["done"] + counts["failed"] + counts["skipped"]
    if finished == total:
        if cancelled:
            return "cancelled"
        return "failed" if counts["done"] == 0 else "done"
    if cancelled:
        return "cancelling"
    return "running" if counts["running"] or finished else "queued"


class JobStore:
    """Redis-backed state of every job."""

    def __init__(self, client: redis.Redis, ttl_s: int = 7 * 24 * 3600) -> None:
        self.r = client
        self.ttl_s = ttl_s
        self._begin = client.register_script(_BEGIN)
        self._cancel = client.register_script(_CANCEL)

    @classmethod
    def from_url(cls, url: str, ttl_s: int = 7 * 24 * 3600) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True), ttl_s)

    @staticmethod
    def _keys(job_id: str) -> dict[str, str]:
        base = f"rib:job:{job_id}"
        names = ("order", "items", "running", "done", "failed", "skipped", "results", "attempts")
        return {"job": base, **{n: f"{base}:{n}" for n in names}}

    def _touch(self, pipe: Any, job_id: str) -> None:
        for key in self._keys(job_id).values():
            pipe.expire(key, self.ttl_s)

    # ---------------------------------------------------------------- lifecycle
    def create(self, job_id: str, kind: str, items: Sequence[JobItem], rib: dict[str, Any],
               owner: str = "") -> None:
        """``owner``: :func:`owner_of` the API key that submits the job; only that key sees it (no key
        sees a job without one)."""
        k = self._keys(job_id)
        with self.r.pipeline() as pipe:
            pipe.hset(k["job"], mapping={"id": job_id, "kind": kind, "owner": owner, "total": len(items),
                                         "cancelled": "0",
                                         "created_at": time.time(), "rib": json.dumps(rib), "seconds_sum": 0})
            for start in range(0, len(items), 1000):
                batch = items[start:start + 1000]
                pipe.rpush(k["order"], *[it.id for it in batch])
                pipe.hset(k["items"], mapping={it.id: json.dumps(it.to_json()) for it in batch})
            self._touch(pipe, job_id)
            pipe.hincrby(STATS_KEY, f"jobs_{kind}", 1)
            pipe.execute()

    def exists(self, job_id: str, owner: str | None = None) -> bool:
        """Whether the job is known (and, given an ``owner``, belongs to it: a job without one belongs to nobody)."""
        if not JOB_ID.fullmatch(job_id):
            return False
        if owner is None:
            return bool(self.r.exists(self._keys(job_id)["job"]))
        return bool(owner) and hmac.compare_digest(self.r.hget(self._keys(job_id)["job"], "owner") or "", owner)

    def begin(self, job_id: str, image_id: str) -> str:
        """``run`` (now marked running), ``skipped`` (job cancelled), ``finished`` (already accounted)
        or ``missing`` (the job expired or never existed)."""
        k = self._keys(job_id)
        return self._begin(keys=[k["job"], k["running"], k["done"], k["failed"], k["skipped"], k["attempts"],
                                 STATS_KEY], args=[image_id, time.time()])

    def mark_done(self, job_id: str, image_id: str, artifacts: Iterable[str], seconds: float | None) -> None:
        """``seconds`` is None when an earlier attempt had already written the results."""
        k = self._keys(job_id)
        with self.r.pipeline() as pipe:
            pipe.srem(k["running"], image_id)
            pipe.hdel(k["failed"], image_id)
            pipe.sadd(k["done"], image_id)
            pipe.hset(k["results"], image_id, json.dumps({"artifacts": sorted(artifacts), "seconds": seconds}))
            if seconds is None:
                pipe.hincrby(STATS_KEY, "images_reused", 1)
            else:
                pipe.hincrbyfloat(k["job"], "seconds_sum", seconds)
                pipe.hincrby(STATS_KEY, "images_done", 1)
                pipe.hincrbyfloat(STATS_KEY, "image_seconds_sum", seconds)
            self._touch(pipe, job_id)
            pipe.execute()

    def mark_failed(self, job_id: str, image_id: str, error: str) -> None:
        k = self._keys(job_id)
        with self.r.pipeline() as pipe:
            pipe.srem(k["running"], image_id)
            pipe.hset(k["failed"], image_id, error[:2000])
            pipe.hincrby(STATS_KEY, "images_failed", 1)
            self._touch(pipe, job_id)
            pipe.execute()

    def cancel(self, job_id: str) -> int:
        """Flag the job cancelled and skip every image not started; returns how many were skipped."""
        k = self._keys(job_id)
        return int(self._cancel(keys=[k["job"], k["order"], k["running"], k["done"], k["failed"], k["skipped"],
                                      STATS_KEY]))

    # ---------------------------------------------------------------- reading
    def status(self, job_id: str, max_errors: int = 50) -> dict[str, Any]:
        k = self._keys(job_id)
        with self.r.pipeline() as pipe:
            pipe.hgetall(k["job"])
            for name in _STATUS_SETS:
                pipe.scard(k[name])
            pipe.hlen(k["failed"])
            pipe.hscan(k["failed"], 0, count=max(1, max_errors))  # a sample: the results list them all
            job, running, done, skipped, failed, (_, errors) = pipe.execute()
        total = int(job["total"])
        counts = {"running": running, "done": done, "failed": failed, "skipped": skipped}
        counts["queued"] = total - sum(counts.values())
        cancelled = job.get("cancelled") == "1"
        now = time.time()
        created = float(job["created_at"])
        started = float(job["started_at"]) if "started_at" in job else None
        finished = float(job["finished_at"]) if "finished_at" in job else None
        computed = float(job.get("seconds_sum", 0))
        return {
            "job_id": job_id, "kind": job["kind"], "state": job_state(total, counts, cancelled), "total": total,
            "counts": counts,
            "errors": [{"id": i, "error": e} for i, e in sorted(errors.items())[:max_errors]],
            "errors_truncated": failed > max_errors,
            "timing": {"created_at": created, "started_at": started, "finished_at": finished,
                       "elapsed_s": round((finished or now) - created, 3),
                       "mean_image_s": round(computed / done, 3) if done else None},
            "rib": json.loads(job["rib"]),
        }

    def items(self, job_id: str, offset: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """Per-image records in submission order: status, labels, error, attempts, artifact names."""
        k = self._keys(job_id)
        end = -1 if limit is None else offset + limit - 1
        ids = self.r.lrange(k["order"], offset, end)
        if not ids:
            return []
        with self.r.pipeline() as pipe:
            pipe.hmget(k["items"], ids)
            pipe.hmget(k["results"], ids)
            pipe.hmget(k["failed"], ids)
            pipe.hmget(k["attempts"], ids)
            for name in _STATUS_SETS:
                pipe.smismember(k[name], ids)
            items, results, failed, attempts, running, done, skipped = pipe.execute()
        out = []
        for n, image_id in enumerate(ids):
            status = ("done" if done[n] else "failed" if failed[n] is not None else "skipped" if skipped[n]
                      else "running" if running[n] else "queued")
            result = json.loads(results[n]) if results[n] and status == "done" else {}
            out.append({"id": image_id, "status": status, "labels": json.loads(items[n])["labels"],
                        "error": failed[n], "attempts": int(attempts[n] or 0),
                        "seconds": result.get("seconds"), "artifacts": result.get("artifacts", [])})
        return out

    def finalize(self, job_id: str, storage: Storage) -> bool:
        """Once every image is accounted for, stamp the end time and write ``index.json`` (idempotent)."""
        if not self.exists(job_id):
            return False
        status = self.status(job_id)
        if status["counts"]["queued"] or status["counts"]["running"]:
            return False
        k = self._keys(job_id)
        self.r.hsetnx(k["job"], "finished_at", time.time())
        status = self.status(job_id, max_errors=0)
        images = [{**{f: it[f] for f in ("id", "status", "labels", "error", "attempts")},
                   "artifacts": {a: image_key(job_id, it["id"], a) for a in it["artifacts"]}}
                  for it in self.items(job_id)]
        index = {key: status[key] for key in ("job_id", "kind", "state", "total", "counts", "timing", "rib")}
        storage.put(index_key(job_id), json.dumps({**index, "images": images}, indent=1).encode(),
                    "application/json")
        return True

    # ---------------------------------------------------------------- offline training jobs
    def create_training(self, job_id: str, spec: dict[str, Any], owner: str = "") -> None:
        key = f"rib:training:{job_id}"
        self.r.hset(key, mapping={"spec": json.dumps(spec), "created_at": time.time(), "owner": owner})
        self.r.expire(key, self.ttl_s)

    def training(self, job_id: str, owner: str) -> dict[str, Any] | None:
        """The training job's record, or None when unknown or not ``owner``'s."""
        found = self.r.hgetall(f"rib:training:{job_id}") if JOB_ID.fullmatch(job_id) else {}
        if not found or not owner or not hmac.compare_digest(found.get("owner", ""), owner):
            return None
        return {"spec": json.loads(found["spec"]), "created_at": float(found["created_at"])}

    def stats(self) -> dict[str, float]:
        return {key: float(v) for key, v in self.r.hgetall(STATS_KEY).items()}
