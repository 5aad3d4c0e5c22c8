"""Peak memory and time of IRN's random walk (``rib_core.refine.random_walk.random_walk``) for one image size.

IRN's own walk builds a dense transition matrix over the stride-4 map on the GPU, which is what
runs users out of memory (reported at 11 GB). Ours is a sparse band at stride 4; this measures its
peak memory on the given device: ``torch.cuda.max_memory_allocated`` on CUDA, and on the CPU the
growth of the process's peak resident set (``ru_maxrss``) over a warmed-up baseline. The dense
matrix's size is printed next to it as arithmetic (not measured). Usage:
``python -m benchmarks.bench_random_walk --size 500 375 [--classes 2] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch

from rib_core.classifier.cam import LocalizationMap
from rib_core.config.stage_configs import RandomWalkConfig
from rib_core.refine.random_walk import random_walk
from rib_core.runtime.provenance import device_name, run_record


def fake_inputs(width: int, height: int, classes: int, device: torch.device,
                rng: np.random.Generator) -> tuple[LocalizationMap, torch.Tensor]:
    """Random map and boundary values: the walk's cost depends on the size only."""
    h4, w4 = -(-height // 4), -(-width // 4)
    cam = rng.random((classes, h4, w4), dtype=np.float32)
    lmap = LocalizationMap(np.arange(classes), cam, np.zeros((classes, height, width), np.float32))
    return lmap, torch.from_numpy(rng.random((h4, w4), dtype=np.float32)).to(device)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, nargs=2, default=[500, 375], metavar=("WIDTH", "HEIGHT"))
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    cfg = RandomWalkConfig()
    random_walk(*fake_inputs(64, 48, args.classes, device, rng), cfg)  # warm-up: libraries and allocator
    lmap, boundary = fake_inputs(*args.size, args.classes, device, rng)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = peak_rss_mb()
    started = time.perf_counter()
    mask = random_walk(lmap, boundary, cfg)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = peak_rss_mb() - base
    seconds = time.perf_counter() - started
    pixels = boundary.numel()
    print(json.dumps({
        "run": run_record(device),
        "image": f"{args.size[0]}x{args.size[1]}", "stride4_map": list(boundary.shape), "classes": args.classes,
        "device": device_name(device),
        "peak_memory_mb": round(peak, 1), "seconds": round(seconds, 3), "mask_shape": list(mask.shape),
        "dense_transition_matrix_mb": round(pixels * pixels * 4 / 2**20, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
