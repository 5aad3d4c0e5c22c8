"""What every generated part of docs/RESULTS.md and the README shares: the line that says when,
from which commit and on which machine a result file was measured, and a section's frame (its
heading, then its paragraphs, or how to produce the file that is missing). The benchmarks that
render their own section (bench_premise, bench_classifier_length) use it as benchmarks.results does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def provenance(result: dict[str, Any]) -> str:
    """One line: when, from which commit and on which machine the file's figures were measured (per
    run for a result merged from runs apart, e.g. a study's seeds)."""
    if "seed_runs" in result:
        return " ".join(f"Seed{'s' * (len(r['seeds']) > 1)} {', '.join(map(str, r['seeds']))}: {provenance(r)}"
                        for r in result["seed_runs"])
    run = result.get("run")
    if not run:
        return "*Date, commit and machine: not recorded in this file.*"
    m = run["machine"]
    load = m.get("load_average_1m")
    busy = "" if load is None else f", load average {load} at the start"
    return (f"*Measured {run['date']} (UTC), commit `{run['commit']}`, on {m['device_name']} ({m['device']}; "
            f"{m['cpus']} CPUs, torch threads: {m['torch_threads']}{busy}), Python {m['python']}, "
            f"torch {m['torch']}.*")


def section(heading: str, result: dict[str, Any] | None, howto: str,
            paragraphs: Callable[[dict[str, Any]], list[str]]) -> str:
    """``heading`` (a Markdown heading line), then ``paragraphs(result)``; without a result file, the
    command that makes it (``howto``, as Markdown)."""
    head = heading + "\n\n"
    if result is None:
        return head + f"No result committed yet. To produce it: {howto}.\n"
    return head + "\n\n".join(paragraphs(result)) + "\n"
