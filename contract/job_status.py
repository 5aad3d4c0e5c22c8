"""An image job's status as the API shows it, from the counts its store reads: the state, the timing,
the rate and the errors (a sample)."""

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
