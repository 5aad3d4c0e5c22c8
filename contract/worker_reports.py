"""What the workers report to the API through Redis: their counters and the classifier they serve.

Workers are separate processes (often on other machines); the API reads these at scrape time
(``/metrics``) and on ``/readyz``, without loading the model (torch) itself.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

STATS_KEY = "rib:stats"  # a hash of counters: images done/failed/skipped/reused, seconds, jobs by kind
CLASSIFIER_KEY = "rib:model:classifier"  # what a worker read of its classifier checkpoint at start-up


def stats(r: redis.Redis) -> dict[str, float]:
    """The workers' counters (the image scripts of :mod:`contract.image_jobs` increment them)."""
    return {key: float(v) for key, v in r.hgetall(STATS_KEY).items()}


def record_classifier(r: redis.Redis, info: dict[str, Any]) -> None:
    """What a worker read of its classifier at start-up (URI, recorded validation mAP): the API
    shows it on /readyz without opening the checkpoint (which would need torch)."""
    r.set(CLASSIFIER_KEY, json.dumps({**info, "recorded_at": time.time()}))


def classifier(r: redis.Redis) -> dict[str, Any] | None:
    """The last classifier a worker recorded, or None."""
    raw = r.get(CLASSIFIER_KEY)
    return json.loads(raw) if raw else None
