"""The images of an image job: the per-image progress of its one stage's chunks.

An image job (an upload, a bulk job) is a staged job of one chunked stage, ``images``
(:class:`contract.pipelines.PipelineStore` records and advances it: chunks, attempts, leases,
completion). What it keeps besides is each image's state, so that a chunk delivered again skips
the images already accounted for and the API shows every image's result: each is in exactly one
of queued, running, done (its files and seconds), failed (with the reason) or skipped (cancelled
before it started). The states are Redis sets and hashes keyed by image id, so a chunk that runs
twice moves an image into the same set again and every count stays exact; every transition is a
Lua script, which none interleaves with a cancel and none recreates a job Redis has lost.

Storage keys are :mod:`rib_core.io.artifacts`' layout: a job's ``request.json`` is written before
it is queued (a job Redis lost is rebuilt from it, its images done from their files) and its
``index.json`` once every image is accounted for.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis

from contract.job_requests import ImageJobSpec
from contract.job_status import status_body
from contract.lua import script
from contract.stages import Send
from contract.stores import RedisJobs
from contract.worker_reports import STATS_KEY
from rib_core.io.artifacts import MARKER, image_key, index_key, stored_files
from rib_core.io.storage import Storage

_STATUS_SETS = ("running", "done", "skipped")
_PARTS = ("order", "items", "running", "done", "failed", "skipped", "results", "attempts")
LOST_REASON = "its worker stopped before finishing it (killed, out of memory, or its chunk was lost)"


class ImageProgress(RedisJobs):
    """The per-image part of the staged store (:class:`contract.pipelines.PipelineStore` is one): an
    image job's ``<prefix>:<id>`` hash holds its settings (kind, rib, refine, chunk size) and times,
    and ``<prefix>:<id>:<part>`` its images (``_PARTS``)."""

    def __init__(self, client: redis.Redis, prefix: str, ttl_s: int, patience_s: float) -> None:
        super().__init__(client, prefix, ttl_s, patience_s)
        self._begin = client.register_script(script("image_begin"))
        self._mark_done = client.register_script(script("image_mark_done"))
        self._mark_failed = client.register_script(script("image_mark_failed"))
        self._give_up = client.register_script(script("image_give_up"))
        self._settle = client.register_script(script("count_chunk", "image_settle"))

    def _image_keys(self, job_id: str) -> dict[str, str]:
        return {"job": self.key(job_id), **{n: self.key(job_id, n) for n in _PARTS}}

    def _ledger(self, job_id: str) -> list[str]:
        """The keys the begin and give-up scripts expect, in their order."""
        k = self._image_keys(job_id)
        return [k["job"], k["running"], k["done"], k["failed"], k["skipped"], k["attempts"], STATS_KEY]

    @staticmethod
    def image_fields(spec: ImageJobSpec) -> dict[str, Any]:
        """What an image job's hash holds besides a staged job's fields."""
        return {"kind": spec.kind, "rib": spec.rib, "refine": spec.refine, "chunk_size": spec.chunk_size,
                "seconds_sum": 0}

    def write_items(self, pipe: Any, job_id: str, spec: ImageJobSpec) -> None:
        """Queue (on ``pipe``) the writes of the job's images, in submission order."""
        k = self._image_keys(job_id)
        for start in range(0, spec.total, 1000):
            batch = spec.items[start:start + 1000]
            pipe.rpush(k["order"], *[it.id for it in batch])
            pipe.hset(k["items"], mapping={it.id: json.dumps(it.to_json()) for it in batch})
        for key in (k["order"], k["items"]):
            pipe.expire(key, self.ttl_s)
        pipe.hincrby(STATS_KEY, f"jobs_{spec.kind}", 1)

    # ---------------------------------------------------------------- an image of a running chunk
    def begin(self, job_id: str, image_id: str, max_attempts: int) -> str:
        """``run`` (now running), ``skipped`` (job cancelled), ``finished`` (already accounted),
        ``exhausted`` (begun ``max_attempts`` times, its worker lost every time: to be failed alone)
        or ``missing`` (the job expired, never existed, or Redis lost it): ``image_begin.lua``."""
        args = [image_id, time.time(), max_attempts]
        return str(self._call(lambda: self._begin(keys=self._ledger(job_id), args=args)))

    def mark_done(self, job_id: str, image_id: str, artifacts: Iterable[str], seconds: float | None) -> bool:
        """``seconds`` is None when an earlier attempt had already written the results. False (and
        nothing written) when Redis no longer has the job."""
        k = self._image_keys(job_id)
        result = json.dumps({"artifacts": sorted(artifacts), "seconds": seconds})
        keys = [k["job"], k["running"], k["failed"], k["done"], k["results"], STATS_KEY, *k.values()]
        args = [image_id, result, "" if seconds is None else seconds, self.ttl_s]
        return bool(self._call(lambda: self._mark_done(keys=keys, args=args)))

    def mark_failed(self, job_id: str, image_id: str, error: str) -> bool:
        """False (and nothing written) when Redis no longer has the job or the image is already done."""
        k = self._image_keys(job_id)
        keys = [k["job"], k["running"], k["failed"], k["done"], STATS_KEY, *k.values()]
        return bool(self._call(lambda: self._mark_failed(keys=keys, args=[image_id, error[:2000], self.ttl_s])))

    def give_up(self, job_id: str, image_ids: Sequence[str], reason: str, attempts: int) -> int:
        """A chunk whose deliveries all died: its images not finished fail with ``reason``, each
        charged the chunk's ``attempts``. Returns how many failed."""
        return int(self._call(lambda: self._give_up(keys=self._ledger(job_id),
                                                    args=[reason[:2000], attempts, *image_ids])))

    def note_lost(self, job_id: str, send: Send, reason: str) -> None:
        """Why a delivery of a chunk stopped (a hard time limit); its images' error if it dies."""
        if self.exists(job_id):
            self._call(lambda: self.r.hset(self.key(job_id, "units"), f"{send.unit}.lost", reason[:500]))

    def lost_reason(self, job_id: str, send: Send, attempts: int) -> str:
        """Why a chunk of images whose ``attempts`` deliveries all died failed."""
        noted = self._call(lambda: self.r.hget(self.key(job_id, "units"), f"{send.unit}.lost"))
        return f"{noted or LOST_REASON} after {attempts} attempts"

    # ---------------------------------------------------------------- the job's end
    def settle(self, job_id: str, stage: str, cancel: bool = False) -> bool:
        """Count every chunk whose images are all accounted for (after a ``cancel`` skipped those not
        started); True when that completed ``stage`` (``image_settle.lua``)."""
        k = self._image_keys(job_id)
        size, chunks = self._call(lambda: self.r.hmget(k["job"], ["chunk_size", "chunks"]))
        if size is None:
            return False
        keys = [k["job"], self.key(job_id, "units"), k["order"], k["running"], k["done"], k["failed"], k["skipped"],
                STATS_KEY]
        args = [stage, size, chunks, time.time(), "1" if cancel else "0"]
        _, completed = self._call(lambda: self._settle(keys=keys, args=args))
        return bool(completed)

    def accounted(self, job_id: str) -> bool:
        """Whether every image of the job is done, failed or skipped."""
        counts = self.image_status(job_id, max_errors=0)["counts"]
        return counts["queued"] == counts["running"] == 0

    def restore_images(self, job_id: str, storage: Storage) -> None:
        """A job rebuilt from its record: images whose files are all in storage (``meta.json``) are
        done, their files reused; the others run again."""
        for image_id, files in stored_files(storage, job_id).items():
            if MARKER in files:
                self.mark_done(job_id, image_id, files, None)

    def write_index(self, job_id: str, storage: Storage) -> dict[str, Any]:
        """Every image is accounted for: stamp the end time and write ``index.json``; returns the
        report kept as the stage's."""
        self._call(lambda: self.r.hsetnx(self.key(job_id), "finished_at", time.time()))
        status = self.image_status(job_id, max_errors=0)
        images = [{**{f: it[f] for f in ("id", "status", "labels", "error", "attempts")},
                   "artifacts": {a: image_key(job_id, it["id"], a) for a in it["artifacts"]}}
                  for it in self.items(job_id)]
        index = {key: status[key] for key in ("job_id", "kind", "state", "total", "counts", "timing", "rib", "refine")}
        storage.put(index_key(job_id), json.dumps({**index, "images": images}, indent=1).encode(), "application/json")
        return status["counts"]

    # ---------------------------------------------------------------- reading
    def image_status(self, job_id: str, max_errors: int = 50) -> dict[str, Any]:
        """The job's state from its images' counts, its timing, rate and (a sample of) its errors."""
        k = self._image_keys(job_id)

        def read() -> list[Any]:
            with self.r.pipeline() as pipe:
                pipe.hgetall(k["job"])
                for name in _STATUS_SETS:
                    pipe.scard(k[name])
                pipe.hlen(k["failed"])
                pipe.hscan(k["failed"], 0, count=max(1, max_errors))  # a sample: the results list them all
                return pipe.execute()

        job, running, done, skipped, failed, (_, errors) = self._call(read)
        counts = {"running": running, "done": done, "failed": failed, "skipped": skipped}
        return status_body(job_id, job, counts, errors, max_errors)

    def items(self, job_id: str, offset: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """Per-image records in submission order: status, labels, error, attempts, artifact names."""
        k = self._image_keys(job_id)
        end = -1 if limit is None else offset + limit - 1
        ids = self._call(lambda: self.r.lrange(k["order"], offset, end))
        if not ids:
            return []

        def read() -> list[Any]:
            with self.r.pipeline() as pipe:
                for name in ("items", "results", "failed", "attempts"):
                    pipe.hmget(k[name], ids)
                for name in _STATUS_SETS:
                    pipe.smismember(k[name], ids)
                return pipe.execute()

        items, results, failed, attempts, running, done, skipped = self._call(read)
        out = []
        for n, image_id in enumerate(ids):
            status = ("done" if done[n] else "failed" if failed[n] is not None else "skipped" if skipped[n]
                      else "running" if running[n] else "queued")
            result = json.loads(results[n]) if results[n] and status == "done" else {}
            out.append({"id": image_id, "status": status, "labels": json.loads(items[n])["labels"],
                        "error": failed[n], "attempts": int(attempts[n] or 0),
                        "seconds": result.get("seconds"), "artifacts": result.get("artifacts", [])})
        return out
