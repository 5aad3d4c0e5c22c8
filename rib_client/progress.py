"""A one-line progress bar with the ETA, drawn from the status bodies (a job's ``progress``; a
pipeline's running stage)."""

from __future__ import annotations

from typing import TextIO

from rib_client.models import JobStatus, PipelineStatus

WIDTH = 24


def duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``12s``."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def stage_fraction(progress: dict[str, float] | None) -> float | None:
    """How far a pipeline stage is, from whichever pair its progress has (chunks, epochs or steps)."""
    for done, total in (("chunks_done", "chunks"), ("epoch", "epochs"), ("step", "steps")):
        if progress and progress.get(total):
            return min(1.0, float(progress.get(done, 0)) / float(progress[total]))
    return None


def describe(status: JobStatus | PipelineStatus) -> tuple[float | None, str]:
    """The done fraction (None: unknown) and the words after the bar."""
    if isinstance(status, JobStatus):
        c, p = status.counts, status.progress
        ended = c.done + c.failed + c.skipped
        words = [f"{ended}/{status.total}", f"{c.failed} failed" if c.failed else "", status.state]
        if p.images_per_minute is not None:
            words.append(f"{p.images_per_minute:.1f} img/min")
        if p.eta_s is not None and not status.finished:
            words.append(f"ETA {duration(p.eta_s)}")
        return (ended / status.total if status.total else None), ", ".join(w for w in words if w)
    names = list(status.stages)
    current = next((n for n in names if status.stages[n].state == "running"), None)
    if current is None:
        return (1.0 if status.state == "done" else None), status.state
    stage = status.stages[current]
    fraction = stage_fraction(stage.progress)
    words = [f"stage {names.index(current) + 1}/{len(names)} {current}", status.state]
    if fraction and stage.seconds is not None and fraction < 1:
        words.append(f"stage ETA {duration(stage.seconds * (1 - fraction) / fraction)}")
    return fraction, ", ".join(words)


class ProgressLine:
    """Redrawn in place on a terminal; elsewhere (a log, a pipe) one line each time it changes."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream, self.label, self.last = stream, label, ""
        self.tty = stream.isatty()

    def update(self, status: JobStatus | PipelineStatus) -> None:
        fraction, words = describe(status)
        filled = round(WIDTH * fraction) if fraction is not None else 0
        line = f"{self.label} [{'#' * filled}{'.' * (WIDTH - filled)}] {words}"
        if line == self.last:
            return
        end = "\n" if status.finished or not self.tty else ""
        self.stream.write(("\r\033[K" if self.tty else "") + line + end)
        self.stream.flush()
        self.last = line
