"""Submit latency of a large bulk job and a large pipeline job (issue 23's goal: under 2 s at 100k images).

The API runs in-process (Starlette's TestClient, no network hop) on a private redis-server and
moto's S3 server, as in the tests; the manifest names ``--images`` synthetic records (their files
are not read at submit: locations are checked, and only the manifest itself must exist). Each
submit is timed from the request to the 202, ``--repeats`` times; what the broker holds after one
submit is counted (the request sends a bounded number of messages, the rest come from a task).

    python -m benchmarks.bench_submit --images 1000 10000 100000 --out runs/bench_submit.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from rib_core.runtime.provenance import run_record
from tests.api_inprocess import BUCKET, inprocess_api

CLASSES = [f"class{i}" for i in range(20)]


def manifest_text(images: int) -> str:
    header = json.dumps({"format": "rib-manifest", "version": 1, "classes": CLASSES})
    lines = [json.dumps({"id": f"img{n:06d}", "image": f"images/img{n:06d}.jpg", "labels": [CLASSES[n % 20]]})
             for n in range(images)]
    return "\n".join([header, *lines]) + "\n"


def time_submits(api: Any, path: str, body: dict[str, Any], repeats: int) -> tuple[list[float], dict[str, int]]:
    broker = redis.Redis.from_url(f"{api.redis_url}/0")
    seconds = []
    for _ in range(repeats):
        broker.flushdb()
        started = time.perf_counter()
        r = api.post(path, json=body)
        seconds.append(time.perf_counter() - started)
        assert r.status_code == 202, r.text
    queued = {q: broker.llen(q) for q in (api.settings.image_queue, api.settings.training_queue)}
    return seconds, queued


def run(images: list[int], repeats: int) -> dict[str, Any]:
    record, rows = run_record(), []  # the record's load average is the one at the start
    with tempfile.TemporaryDirectory() as tmp, inprocess_api(Path(tmp), CLASSES, ["bench"],
                                                             max_manifest_bytes=200 * 2**20) as api:
        api.s3.put_object(Bucket=BUCKET, Key="bench/classifier.pth", Body=b"x")
        for n in images:
            api.s3.put_object(Bucket=BUCKET, Key=f"bench/{n}.jsonl", Body=manifest_text(n).encode())
            uri = f"s3://{BUCKET}/bench/{n}.jsonl"
            for kind, path, body in (
                ("bulk job", "/v1/jobs", {"manifest_uri": uri}),
                ("pipeline", "/v1/pipelines", {"manifest_uri": uri}),
                ("pipeline, classifier given", "/v1/pipelines",
                 {"manifest_uri": uri, "classifier_uri": f"s3://{BUCKET}/bench/classifier.pth"}),
            ):
                seconds, queued = time_submits(api, path, body, repeats)
                rows.append({"images": n, "kind": kind, "median_s": round(statistics.median(seconds), 3),
                             "max_s": round(max(seconds), 3), "messages_sent_by_request": queued})
    return {"run": record, "repeats": repeats, "rows": rows, "load_average_1m_end": round(os.getloadavg()[0], 2)}


def table(result: dict[str, Any]) -> str:
    out = ["| images | submit | median s | max s | messages the request sent (image / training queue) |",
           "|---|---|---|---|---|"]
    for r in result["rows"]:
        q = list(r["messages_sent_by_request"].values())
        out.append(f"| {r['images']:,} | {r['kind']} | {r['median_s']} | {r['max_s']} | {q[0]} / {q[1]} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_submit.json"))
    args = parser.parse_args()
    result = run(args.images, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
