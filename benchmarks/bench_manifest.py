"""Time of the API's manifest validation (``service.validation.manifest_items``) for a number of lines.

A bulk job's manifest is checked line by line before anything is queued: JSON, ids, classes,
duplicates, allowed locations. This times that check on a synthetic manifest of ``--lines`` images
(VOC's classes, one to three labels each, every id distinct), best of ``--repeat`` runs, and prints
lines per second and the CPU seconds of each run. Usage: ``python -m benchmarks.bench_manifest --lines 100000``.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from rib_core.data.classes import VOC_CLASSES
from rib_core.runtime.provenance import run_record
from service.validation import manifest_items


def manifest_text(lines: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    header = {"format": "rib-manifest", "version": 1, "classes": list(VOC_CLASSES)}
    records = [{"id": f"img{n:07d}", "image": f"images/img{n:07d}.jpg",
                "labels": rng.sample(list(VOC_CLASSES), rng.randint(1, 3))} for n in range(lines)]
    return "\n".join(json.dumps(r) for r in [header, *records]) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lines", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    text = manifest_text(args.lines)
    times, cpu = [], []
    for _ in range(args.repeat):
        started, started_cpu = time.perf_counter(), time.process_time()
        items = manifest_items(text, "s3://bench/data", list(VOC_CLASSES), ["s3://bench/"], args.lines)
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    assert len(items) == args.lines
    best = min(times)
    # CPU seconds next to wall seconds: on a shared machine the wall time includes waiting for a core.
    print(json.dumps({"run": run_record(), "lines": args.lines, "bytes": len(text.encode()), "best_s": round(best, 3),
                      "runs_s": [round(t, 3) for t in times], "cpu_s": [round(t, 3) for t in cpu],
                      "lines_per_s": round(args.lines / best)}))


if __name__ == "__main__":
    main()
