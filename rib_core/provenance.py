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


def git_commit() -> str | None:
    """The checkout's commit (with ``-dirty`` when files differ from it), or None outside git."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).resolve().parent, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


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
