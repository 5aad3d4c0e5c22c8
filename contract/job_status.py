"""A job's status as the API shows it, from what its store reads: an image job's from its images'
counts (the state, the timing, the rate and the errors, a sample), a staged job's from its stages'."""

from __future__ import annotations

import json
import time
from typing import Any


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


def status_body(job_id: str, job: dict[str, str], counts: dict[str, int], errors: dict[str, str],
                max_errors: int) -> dict[str, Any]:
    """The status of a job whose hash is ``job`` and whose images are ``counts`` (running, done,
    failed, skipped; the rest are queued); ``errors``: a sample of its failed images."""
    total = int(job["total"])
    counts = {**counts, "queued": total - sum(counts.values())}
    cancelled = job.get("cancelled") == "1"
    now = time.time()
    created = float(job["created_at"])
    started = float(job["started_at"]) if "started_at" in job else None
    finished = float(job["finished_at"]) if "finished_at" in job else None
    computed = float(job.get("seconds_sum", 0))
    done = counts["done"]
    return {
        "job_id": job_id, "kind": job["kind"], "state": job_state(total, counts, cancelled), "total": total,
        "counts": counts,
        "errors": [{"id": i, "error": e} for i, e in sorted(errors.items())[:max_errors]],
        "errors_truncated": counts["failed"] > max_errors,
        "timing": {"created_at": created, "started_at": started, "finished_at": finished,
                   "elapsed_s": round((finished or now) - created, 3),
                   "mean_image_s": round(computed / done, 3) if done else None},
        "progress": progress(counts, started, finished, now),
        "rib": json.loads(job["rib"]),
        "refine": json.loads(job.get("refine") or "{}"),
    }


def pipeline_state(stages: dict[str, dict[str, Any]], cancelled: bool) -> str:
    """The job's state from its stages': failed or cancelled once any stage is, done once all are
    done (or skipped), cancelling while a cancelled job still runs a stage."""
    states = [s["state"] for s in stages.values()]
    if "failed" in states:
        return "failed"
    if cancelled:
        return "cancelling" if "running" in states else "cancelled"
    if all(s in ("done", "skipped") for s in states):
        return "done"
    return "running" if any(s != "pending" for s in states) else "queued"


def staged_body(job_id: str, raw: dict[str, str], failures: dict[str, str], chunked: str | None) -> dict[str, Any]:
    """The status of a staged job whose hash is ``raw``: each stage's state, times, progress, report and
    error; ``chunked``: its stage run in chunks (if any), whose progress counts them, and
    ``failures`` that stage's images without a result."""
    now = time.time()
    stages: dict[str, dict[str, Any]] = {}
    for stage in json.loads(raw["stages"]):
        started, finished = raw.get(f"{stage}.started"), raw.get(f"{stage}.finished")
        stages[stage] = {
            "state": raw.get(f"{stage}.state", "pending"),
            "started_at": float(started) if started else None,
            "finished_at": float(finished) if finished else None,
            "seconds": round((float(finished) if finished else now) - float(started), 1) if started else None,
            "progress": json.loads(raw[f"{stage}.progress"]) if f"{stage}.progress" in raw else None,
            "report": json.loads(raw[f"{stage}.report"]) if f"{stage}.report" in raw else None,
            "error": raw.get(f"{stage}.error"),
        }
    if chunked is not None:
        stages[chunked]["progress"] = {"chunks_done": int(raw.get("chunks_done", 0)), "chunks": int(raw["chunks"]),
                                       "images_failed": len(failures)}
        if failures:
            stages[chunked]["error"] = stages[chunked]["error"] or "; ".join(
                f"{k}: {v}" for k, v in sorted(failures.items())[:10])
    cancelled = raw.get("cancelled") == "1"
    return {"job_id": job_id, "state": pipeline_state(stages, cancelled), "total": int(raw["total"]),
            "created_at": float(raw["created_at"]), "cancelled": cancelled, "stages": stages}
