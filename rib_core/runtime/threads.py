"""How many threads torch computes with: the cores this process may use, shared among its peers.

torch's default (every core of the machine) collapses under contention: on a 2-core machine with
one other busy process, RIB ran 16x slower than with one thread. Workers and the CLI set the count
from the cores they actually have (``os.sched_getaffinity``: containers and ``taskset`` included).
"""

from __future__ import annotations

import os

import torch


def available_cores() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def torch_threads(requested: int | None = None, processes: int = 1) -> int:
    """``requested`` if given, else an explicit ``OMP_NUM_THREADS``, else this process's share of the
    cores among ``processes`` (at least 1)."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return requested or (int(omp) if omp.isdigit() and int(omp) > 0 else max(1, available_cores() // max(1, processes)))


def use_torch_threads(requested: int | None = None, processes: int = 1) -> int:
    """Set torch's intra-op thread count (see ``torch_threads``); returns it."""
    n = torch_threads(requested, processes)
    torch.set_num_threads(n)
    return n
