"""Job bookkeeping in Redis and the layout of results in storage, shared by the API and the workers.

A job is a list of images. Each image is in exactly one of: queued, running, done, failed,
skipped (cancelled before it started). The states are Redis sets and hashes keyed by image id, so
a task that runs twice (a worker killed and its chunk redelivered) moves an image into the same
set again and every count stays exact. Every transition is a Lua script, which Redis runs
atomically: none interleaves with a cancellation, and none recreates a job Redis has lost.

An image is attempted a bounded number of times. A running image carries a heartbeat; one whose
heartbeat is older than a lease (its worker died, its chunk was lost) is handed out again by the
reaper (``JobStore.reap``) or, past the bound, failed with the reason.

Storage keys are :mod:`rib_core.io.artifacts`' layout: a job's ``request.json`` is written before it
is queued (a job Redis lost is rebuilt from it) and its ``index.json`` once every image is
accounted for.
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

from contract.lua import script
from contract.records import Records, UntrustedRecordError
from contract.webhooks import notify_finished
from rib_core.data.datasets import parse_manifest
from rib_core.io.artifacts import MARKER, image_key, index_key, job_manifest_key, request_key, stored_files
from rib_core.io.storage import Storage

JOB_ID = re.compile(r"[0-9a-f]{32}")
STATS_KEY = "rib:stats"
CLASSIFIER_KEY = "rib:model:classifier"  # what a worker read of its classifier checkpoint at start-up
_STATUS_SETS = ("running", "done", "skipped")

ACTIVE_KEY = "rib:jobs:active"  # jobs with an image started and not yet finalized: what the reaper scans
LOST_REASON = "its worker stopped before finishing it (killed, out of memory, or its chunk was lost)"

# give_up(id, reason): fail an image that has used up its attempts (KEYS: job, running, failed, beat,
# lost, stats, attempts); the reason is the one recorded for its last lost attempt, if any.
_GIVE_UP = """
local function give_up(id, default)
  local reason = redis.call('HGET', KEYS[5], id) or default
  local n = redis.call('HGET', KEYS[7], id) or '0'
  redis.call('SREM', KEYS[2], id)
  redis.call('HDEL', KEYS[4], id)
  redis.call('HSET', KEYS[3], id, reason .. ' after ' .. n .. ' attempts')
  redis.call('HINCRBY', KEYS[6], 'images_failed', 1)
end
"""

# begin: skip if the job is cancelled, do nothing if the image already finished, fail it if its earlier
# attempts used up the bound, else mark it running (with a heartbeat).
_BEGIN = _GIVE_UP + """
local job, running, failed, beat, attempts = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[7]
local done, skipped = KEYS[8], KEYS[9]
local id = ARGV[1]
if redis.call('EXISTS', job) == 0 then
  return 'missing'
end
if redis.call('SISMEMBER', done, id) == 1 or redis.call('HEXISTS', failed, id) == 1
   or redis.call('SISMEMBER', skipped, id) == 1 then
  return 'finished'
end
local started = redis.call('SISMEMBER', running, id) == 1
-- an image whose earlier attempt died mid-way counts as started: it is redone even after a cancel
if redis.call('HGET', job, 'cancelled') == '1' and not started then
  redis.call('SADD', skipped, id)
  redis.call('HINCRBY', KEYS[6], 'images_skipped', 1)
  return 'skipped'
end
if started and tonumber(redis.call('HGET', attempts, id) or '0') >= tonumber(ARGV[3]) then
  give_up(id, ARGV[4])
  return 'failed'
end
redis.call('SADD', running, id)
redis.call('HINCRBY', attempts, id, 1)
redis.call('HSET', beat, id, ARGV[2])
redis.call('HSETNX', job, 'started_at', ARGV[2])
redis.call('SADD', KEYS[10], ARGV[5])
return 'run'
"""

# reap: fail (``failed``) a running image whose heartbeat is older than ARGV[2], or put it back among the
# queued ones (``requeue``: the caller queues it again; its attempts are kept, so the bound holds);
# ``alive`` when it is not stale (any more). Same KEYS as give_up.
_REAP = _GIVE_UP + """
local id = ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('SISMEMBER', KEYS[2], id) == 0 then return 'alive' end
if tonumber(redis.call('HGET', KEYS[4], id) or '0') >= tonumber(ARGV[2]) then return 'alive' end
if tonumber(redis.call('HGET', KEYS[7], id) or '0') >= tonumber(ARGV[3]) then
  give_up(id, ARGV[4])
  return 'failed'
end
redis.call('SREM', KEYS[2], id)
redis.call('HDEL', KEYS[4], id)
return 'requeue'
"""

# mark_done / mark_failed: nothing when Redis no longer has the job (it expired or was lost), so no
# partial job is ever recreated; a failure never overrides a success.
_MARK_DONE = """
local job, running, failed, beat, done, results = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
if redis.call('EXISTS', job) == 0 then return 0 end
local id = ARGV[1]
redis.call('SREM', running, id)
redis.call('HDEL', failed, id)
redis.call('HDEL', beat, id)
redis.call('SADD', done, id)
redis.call('HSET', results, id, ARGV[2])
if ARGV[3] == '' then
  redis.call('HINCRBY', KEYS[7], 'images_reused', 1)
else
  redis.call('HINCRBYFLOAT', job, 'seconds_sum', ARGV[3])
  redis.call('HINCRBY', KEYS[7], 'images_done', 1)
  redis.call('HINCRBYFLOAT', KEYS[7], 'image_seconds_sum', ARGV[3])
end
for i = 8, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
return 1
"""

_MARK_FAILED = """
local job, running, failed, beat, done = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
if redis.call('EXISTS', job) == 0 or redis.call('SISMEMBER', done, ARGV[1]) == 1 then return 0 end
redis.call('SREM', running, ARGV[1])
redis.call('HDEL', beat, ARGV[1])
redis.call('HSET', failed, ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[6], 'images_failed', 1)
for i = 7, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
return 1
"""

# heartbeat: refresh the heartbeat of the listed images that are still running.
_HEARTBEAT = """
for _, id in ipairs(ARGV) do
  if id ~= ARGV[1] and redis.call('SISMEMBER', KEYS[1], id) == 1 then redis.call('HSET', KEYS[2], id, ARGV[1]) end
end
"""

# note_lost: record why the running ones of these images stopped (shown if they run out of attempts).
_NOTE_LOST = """
for i = 2, #ARGV do
  if redis.call('SISMEMBER', KEYS[1], ARGV[i]) == 1 then redis.call('HSET', KEYS[2], ARGV[i], ARGV[1]) end
end
"""

# stamp_finished: the end time, only on a job Redis still has.
_STAMP_FINISHED = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSETNX', KEYS[1], 'finished_at', ARGV[1]) end
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


@dataclass(frozen=True)
class SubmittedManifest:
    """The manifest a bulk job's images came from, as the request named it: ``text`` validated against
    ``classes``, relative locations resolved against ``base``."""

    text: str
    base: str
    classes: tuple[str, ...]

    def items(self) -> list[JobItem]:
        manifest = parse_manifest(self.text, base=self.base, classes=self.classes)
        return [JobItem(r.id, manifest.image_uri(r), r.labels) for r in manifest.records]


def save_request(records: Records, job_id: str, kind: str, items: Sequence[JobItem], rib: dict[str, Any],
                 owner: str = "", refine: dict[str, Any] | None = None, callback_url: str | None = None,
                 manifest: SubmittedManifest | None = None) -> None:
    """Keep what a job was asked to do (and whose it is) next to its results, signed, so that a job
    Redis lost can be rebuilt (and only from a record the service wrote).

    A job from a ``manifest`` keeps that manifest's bytes frozen beside the record (its digest signed
    in it) instead of its items re-encoded: one write of bytes already in hand, which is most of what
    recording a 100,000-image job cost; :func:`request_items` reads them back either way."""
    body = {"job_id": job_id, "kind": kind, "owner": owner, "rib": rib, "refine": refine or {},
            "callback_url": callback_url}
    if manifest is None:
        body["items"] = [it.to_json() for it in items]
    else:
        key = job_manifest_key(job_id)
        body["manifest"] = {"key": key, "sha256": records.put_frozen(key, manifest.text.encode()),
                            "base": manifest.base, "classes": list(manifest.classes)}
    records.put(request_key(job_id), body)


def load_request(records: Records, job_id: str) -> dict[str, Any]:
    """The job's ``request.json`` (what :func:`save_request` kept). FileNotFoundError without one,
    UntrustedRecordError when the service did not write it."""
    return records.get(request_key(job_id))


def request_items(records: Records, request: dict[str, Any]) -> list[JobItem]:
    """A kept request's images: its items, or those of its frozen manifest (checked against the signed
    digest: UntrustedRecordError if the copy changed)."""
    if "manifest" not in request:
        return [JobItem.from_json(d) for d in request["items"]]
    frozen = request["manifest"]
    text = records.get_frozen(frozen["key"], frozen["sha256"]).decode()
    return SubmittedManifest(text, frozen["base"], tuple(frozen["classes"])).items()


def job_state(total: int, counts: dict[str, int], cancelled: bool) -> str:
    finished = counts["done"] + counts["failed"] + counts["skipped"]
    if finished == total:
        if cancelled:
            return "cancelled"
        return "failed" if counts["done"] == 0 else "done"
    if cancelled:
        return "cancelling"
    return "running" if counts["running"] or finished else "queued"


def progress(counts: dict[str, int], started: float | None, finished: float | None,
             now: float) -> dict[str, float | int | None]:
    """Images per minute since the first image started (failed ones count: they took a worker's
    time) and, while images remain, the seconds to go at that rate; None before the first finishes."""
    worked = counts["done"] + counts["failed"]
    remaining = counts["queued"] + counts["running"]
    elapsed = (finished or now) - started if started is not None else 0.0
    if not worked or elapsed <= 0:
        return {"images_per_minute": None, "eta_s": None, "remaining": remaining}
    per_minute = 60.0 * worked / elapsed
    return {"images_per_minute": round(per_minute, 2), "eta_s": round(60.0 * remaining / per_minute, 1),
            "remaining": remaining}


class JobStore:
    """Redis-backed state of every job."""

    def __init__(self, client: redis.Redis, ttl_s: int = 7 * 24 * 3600) -> None:
        self.r = client
        self.ttl_s = ttl_s
        self._begin = client.register_script(_BEGIN)
        self._cancel = client.register_script(_CANCEL)
        self._reap = client.register_script(_REAP)
        self._mark_done = client.register_script(_MARK_DONE)
        self._mark_failed = client.register_script(_MARK_FAILED)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._note_lost = client.register_script(_NOTE_LOST)
        self._stamp_finished = client.register_script(_STAMP_FINISHED)
        self._count_attempt = client.register_script(script("count_attempt"))

    @classmethod
    def from_url(cls, url: str, ttl_s: int = 7 * 24 * 3600) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True), ttl_s)

    @staticmethod
    def _keys(job_id: str) -> dict[str, str]:
        base = f"rib:job:{job_id}"
        names = ("order", "items", "running", "done", "failed", "skipped", "results", "attempts", "beat", "lost")
        return {"job": base, **{n: f"{base}:{n}" for n in names}}

    def _touch(self, pipe: Any, job_id: str) -> None:
        for key in self._keys(job_id).values():
            pipe.expire(key, self.ttl_s)

    # ---------------------------------------------------------------- lifecycle
    def create(self, job_id: str, kind: str, items: Sequence[JobItem], rib: dict[str, Any],
               owner: str = "", refine: dict[str, Any] | None = None, callback_url: str | None = None) -> None:
        """``owner``: :func:`owner_of` the API key that submits the job; only that key sees it (no key
        sees a job without one). ``rib`` and ``refine``: the job's settings, as JSON. ``callback_url``:
        where :meth:`finalize` has the final state POSTed (:mod:`contract.webhooks`)."""
        k = self._keys(job_id)
        with self.r.pipeline() as pipe:
            pipe.hset(k["job"], mapping={"id": job_id, "kind": kind, "owner": owner, "total": len(items),
                                         "cancelled": "0",
                                         "created_at": time.time(), "rib": json.dumps(rib),
                                         "refine": json.dumps(refine or {}), "seconds_sum": 0,
                                         **({"callback_url": callback_url} if callback_url else {})})
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

    def _attempt_keys(self, job_id: str) -> list[str]:
        """The keys ``_GIVE_UP`` expects, in its order."""
        k = self._keys(job_id)
        return [k["job"], k["running"], k["failed"], k["beat"], k["lost"], STATS_KEY, k["attempts"]]

    def begin(self, job_id: str, image_id: str, max_attempts: int = 3) -> str:
        """``run`` (now marked running), ``skipped`` (job cancelled), ``finished`` (already accounted),
        ``failed`` (its earlier ``max_attempts`` attempts all died) or ``missing`` (the job expired,
        never existed, or Redis lost it)."""
        k = self._keys(job_id)
        return self._begin(keys=[*self._attempt_keys(job_id), k["done"], k["skipped"], ACTIVE_KEY],
                           args=[image_id, time.time(), max_attempts, LOST_REASON, job_id])

    def heartbeat(self, job_id: str, image_ids: Sequence[str]) -> None:
        """Tell the reaper these images (those of them still running) are alive."""
        k = self._keys(job_id)
        self._heartbeat(keys=[k["running"], k["beat"]], args=[time.time(), *image_ids])

    def note_lost(self, job_id: str, image_ids: Sequence[str], reason: str) -> None:
        """Record why the running ones of these images stopped; their final error names it."""
        k = self._keys(job_id)
        self._note_lost(keys=[k["running"], k["lost"]], args=[reason[:500], *image_ids])

    def mark_done(self, job_id: str, image_id: str, artifacts: Iterable[str], seconds: float | None) -> bool:
        """``seconds`` is None when an earlier attempt had already written the results. False (and
        nothing written) when Redis no longer has the job."""
        k = self._keys(job_id)
        result = json.dumps({"artifacts": sorted(artifacts), "seconds": seconds})
        keys = [k["job"], k["running"], k["failed"], k["beat"], k["done"], k["results"], STATS_KEY]
        return bool(self._mark_done(keys=keys + list(k.values()),
                                    args=[image_id, result, "" if seconds is None else seconds, self.ttl_s]))

    def mark_failed(self, job_id: str, image_id: str, error: str) -> bool:
        """False (and nothing written) when Redis no longer has the job or the image is already done."""
        k = self._keys(job_id)
        keys = [k["job"], k["running"], k["failed"], k["beat"], k["done"], STATS_KEY]
        return bool(self._mark_failed(keys=keys + list(k.values()),
                                      args=[image_id, error[:2000], self.ttl_s]))

    def reap(self, lease_s: float, max_attempts: int) -> dict[str, list[JobItem]]:
        """Running images whose heartbeat is older than ``lease_s``: each is either handed back (queued
        again in Redis; the returned items, per job, are to be sent to the queue) or, once it has had
        ``max_attempts`` attempts, failed with the reason (its job is then returned with no items, to
        be finalized). Jobs Redis no longer has leave the scan."""
        now = time.time()
        requeue: dict[str, list[JobItem]] = {}
        for job_id in self.r.smembers(ACTIVE_KEY):
            k = self._keys(job_id)
            if not self.r.exists(k["job"]):
                self.r.srem(ACTIVE_KEY, job_id)
                continue
            beats = self.r.hgetall(k["beat"])
            stale = [i for i in self.r.smembers(k["running"]) if float(beats.get(i, 0)) < now - lease_s]
            if stale:
                requeue[job_id] = []
            for image_id in stale:
                verdict = self._reap(keys=self._attempt_keys(job_id),
                                     args=[image_id, now - lease_s, max_attempts, LOST_REASON])
                if verdict == "requeue":
                    raw = self.r.hget(k["items"], image_id)
                    if raw:
                        requeue[job_id].append(JobItem.from_json(json.loads(raw)))
        return requeue

    def rib(self, job_id: str) -> dict[str, Any]:
        """The RIB parameters a job was submitted with."""
        return json.loads(self.r.hget(self._keys(job_id)["job"], "rib") or "{}")

    def refine(self, job_id: str) -> dict[str, Any]:
        """The refinement settings a job was submitted with."""
        return json.loads(self.r.hget(self._keys(job_id)["job"], "refine") or "{}")

    def cancel(self, job_id: str) -> int:
        """Flag the job cancelled and skip every image not started; returns how many were skipped."""
        k = self._keys(job_id)
        return int(self._cancel(keys=[k["job"], k["order"], k["running"], k["done"], k["failed"], k["skipped"],
                                      STATS_KEY]))

    def restore(self, job_id: str, records: Records) -> list[JobItem] | None:
        """Rebuild a job Redis no longer has (a restart without persistence, an eviction) from its
        signed ``request.json``: images whose ``meta.json`` is in storage are done (their files
        reused), the rest are returned, to be queued again. None when storage has no such job (or
        only a record the service did not write); [] while another process is rebuilding it."""
        if not JOB_ID.fullmatch(job_id):
            return None
        try:
            request = load_request(records, job_id)
            items = request_items(records, request)
        except (FileNotFoundError, UntrustedRecordError):
            return None
        if not self.r.set(f"rib:restoring:{job_id}", 1, nx=True, ex=60) or self.exists(job_id):
            return []
        self.create(job_id, request["kind"], items, request["rib"], request.get("owner", ""), request.get("refine"),
                    request.get("callback_url"))
        files = stored_files(records.storage, job_id)
        for it in items:
            if MARKER in files.get(it.id, []):
                self.mark_done(job_id, it.id, files[it.id], None)
        return [it for it in items if MARKER not in files.get(it.id, [])]

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
            "progress": progress(counts, started, finished, now),
            "rib": json.loads(job["rib"]),
            "refine": json.loads(job.get("refine") or "{}"),
        }

    def total(self, job_id: str) -> int:
        """The job's number of images (0 when Redis no longer has it)."""
        return int(self.r.hget(self._keys(job_id)["job"], "total") or 0)

    def cancelled(self, job_id: str) -> bool:
        return self.r.hget(self._keys(job_id)["job"], "cancelled") == "1"

    def pending_items(self, job_id: str, offset: int, limit: int) -> list[JobItem]:
        """The images at positions ``offset`` to ``offset + limit`` of the job, less those done."""
        k = self._keys(job_id)
        ids = self.r.lrange(k["order"], offset, offset + limit - 1)
        if not ids:
            return []
        with self.r.pipeline() as pipe:
            pipe.hmget(k["items"], ids)
            pipe.smismember(k["done"], ids)
            raw, done = pipe.execute()
        return [JobItem.from_json(json.loads(r)) for r, d in zip(raw, done, strict=True) if r and not d]

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
        """Once every image is accounted for, stamp the end time, write ``index.json`` and queue the
        job's callback, if it has one (idempotent: the callback is sent once)."""
        if not self.exists(job_id):
            return False
        status = self.status(job_id)
        if status["counts"]["queued"] or status["counts"]["running"]:
            return False
        self._stamp_finished(keys=[self._keys(job_id)["job"]], args=[time.time()])
        self.r.srem(ACTIVE_KEY, job_id)
        status = self.status(job_id, max_errors=0)
        images = [{**{f: it[f] for f in ("id", "status", "labels", "error", "attempts")},
                   "artifacts": {a: image_key(job_id, it["id"], a) for a in it["artifacts"]}}
                  for it in self.items(job_id)]
        index = {key: status[key] for key in ("job_id", "kind", "state", "total", "counts", "timing", "rib", "refine")}
        storage.put(index_key(job_id), json.dumps({**index, "images": images}, indent=1).encode(),
                    "application/json")
        callback_url, owner = self.r.hmget(self._keys(job_id)["job"], ["callback_url", "owner"])
        notify_finished(self.r, "image", job_id, self.status(job_id), callback_url, owner or "", self.ttl_s)
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

    def training_attempt(self, job_id: str) -> int:
        """Count a delivery of a training job; 0 when Redis no longer has it."""
        return int(self._count_attempt(keys=[f"rib:training:{job_id}"]))

    def stats(self) -> dict[str, float]:
        return {key: float(v) for key, v in self.r.hgetall(STATS_KEY).items()}

    # ---------------------------------------------------------------- the model the workers serve
    def record_classifier(self, info: dict[str, Any]) -> None:
        """What a worker read of its classifier at start-up (URI, recorded validation mAP): the
        API shows it on /readyz without opening the checkpoint (which would need torch)."""
        self.r.set(CLASSIFIER_KEY, json.dumps({**info, "recorded_at": time.time()}))

    def classifier(self) -> dict[str, Any] | None:
        raw = self.r.get(CLASSIFIER_KEY)
        return json.loads(raw) if raw else None
