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

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis

from contract.job_requests import JobItem, load_request, request_items
from contract.job_status import status_body
from contract.lua import script
from contract.records import Records, UntrustedRecordError
from contract.stores import JOB_ID, RedisJobs
from contract.webhooks import notify_finished
from contract.worker_reports import STATS_KEY
from rib_core.io.artifacts import MARKER, image_key, index_key, stored_files
from rib_core.io.storage import Storage

_STATUS_SETS = ("running", "done", "skipped")

ACTIVE_KEY = "rib:jobs:active"  # jobs with an image started and not yet finalized: what the reaper scans
LOST_REASON = "its worker stopped before finishing it (killed, out of memory, or its chunk was lost)"


class JobStore(RedisJobs):
    """Redis-backed state of every image job: ``rib:job:<id>`` and its parts (``_keys``)."""

    def __init__(self, client: redis.Redis, ttl_s: int = 7 * 24 * 3600) -> None:
        super().__init__(client, "rib:job", ttl_s)
        self._begin = client.register_script(script("image_give_up", "image_begin"))
        self._cancel = client.register_script(script("image_cancel"))
        self._reap = client.register_script(script("image_give_up", "image_reap"))
        self._mark_done = client.register_script(script("image_mark_done"))
        self._mark_failed = client.register_script(script("image_mark_failed"))
        self._heartbeat = client.register_script(script("image_heartbeat"))
        self._note_lost = client.register_script(script("image_note_lost"))
        self._stamp_finished = client.register_script(script("image_stamp_finished"))

    @classmethod
    def from_url(cls, url: str, ttl_s: int = 7 * 24 * 3600) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True), ttl_s)

    def _keys(self, job_id: str) -> dict[str, str]:
        names = ("order", "items", "running", "done", "failed", "skipped", "results", "attempts", "beat", "lost")
        return {"job": self.key(job_id), **{n: self.key(job_id, n) for n in names}}

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
        counts = {"running": running, "done": done, "failed": failed, "skipped": skipped}
        return status_body(job_id, job, counts, errors, max_errors)

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
