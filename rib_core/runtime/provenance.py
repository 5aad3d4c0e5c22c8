"""Where a result came from: date, commit and machine, recorded next to the figures.

Result files (the demo's ``report.json``, ``rib study``'s ``study.json``, the benchmarks' JSON) carry
this record so that docs/RESULTS.md, generated from them, can state when, from which code and on
which machine each figure was measured, without anyone typing it.
"""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch


def cpu_name() -> str:
    """The CPU's model name (``platform.processor()`` is only the architecture on Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str) -> str:
    """The GPU's name on CUDA, else the CPU's."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True,
                          cwd=Path(__file__).resolve().parent).stdout.strip()


def git_commit() -> str | None:
    """The checkout's commit, with ``-dirty`` when code differs from it, or None outside git.

    Changed docs (``docs/``, Markdown) do not count: result files are written there, and they do
    not change what ran."""
    try:
        commit = _git("rev-parse", "--short=12", "HEAD")
        changed = _git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)docs",
                       ":(top,exclude)*.md")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if changed else commit


def run_record(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Date (UTC), commit and machine of a run on ``device``: the ``run`` entry of a result file."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": {"device": str(device), "device_name": device_name(device), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "os": platform.platform(terse=True),
                    "python": platform.python_version(), "torch": torch.__version__,
                    # how busy the machine was: timings on a shared machine are slower than on a quiet one
                    "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None},
    }
