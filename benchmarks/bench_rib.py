"""RIB speed: our ``RibRunner`` against the plain reference of the official loop, in one run.

Prints seconds per image and images per second for both, and their ratio, for one configuration.
Both run every one of the K steps (no early stop) on the same images with the same companions.
It also times ``RibRunner.run_many`` on all the images at once (one batched step for all).
Usage: ``python -m benchmarks.bench_rib --arch resnet18 --images 4`` (CPU, small), or on a GPU
``python -m benchmarks.bench_rib --arch resnet50 --size 500 --crop 512 --companions 20 --device cuda``
(the paper's settings).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import numpy as np
import torch

from rib_core.companions import CompanionPool
from rib_core.networks import CamNet
from rib_core.rib import RibRunner
from rib_core.rib_config import RibConfig
from tests.rib_reference import reference_rib


def synthetic_pool(n: int, size: int, classes: int, rng: np.random.Generator) -> CompanionPool:
    """Random images with one or two labels each: speed does not depend on the content."""
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    labels = np.zeros((n, classes), bool)
    for i in range(n):
        labels[i, rng.choice(classes, size=int(rng.integers(1, 3)), replace=False)] = True
    return CompanionPool(images, labels, [str(i) for i in range(n)], [f"c{i}" for i in range(classes)])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's (for the figures' records)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=96, help="target image side (px)")
    p.add_argument("--crop", type=int, default=96, help="companion crop (px)")
    p.add_argument("--companions", type=int, default=8)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = CamNet(args.classes, args.arch).to(device).eval()
    pool = synthetic_pool(64, args.size, args.classes, rng)
    cfg = RibConfig(iterations=args.iterations, companions=args.companions, crop_size=args.crop,
                    resize_long=(int(args.crop * 0.625), int(args.crop * 1.25)), margin=1e12, explode_ratio=1.0)
    targets = [(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8), [0]) for _ in range(args.images)]
    runner = RibRunner(model, pool, cfg, device)
    runner.run(*targets[0], seed=0)  # warm-up (allocator, cudnn)

    def timed(fn: Callable[..., object], *args: object) -> float:
        sync(device)
        start = time.perf_counter()
        fn(*args)
        sync(device)
        return time.perf_counter() - start

    # Interleaved, image by image, so that a change in machine load hits both the same way.
    ours_t, ref_t = [], []
    for i, (img, keys) in enumerate(targets):
        ours_t.append(timed(lambda im, k, j: runner.run(im, k, seed=j), img, keys, i))
        if device.type == "cpu":  # the reference keeps the official loop's host-side tensors
            ref_t.append(timed(lambda im, k, j: reference_rib(model, pool, im, k, cfg, seed=j), img, keys, i))
    ours = float(np.mean(ours_t))
    ref = float(np.mean(ref_t)) if ref_t else float("nan")
    images, keys = [t[0] for t in targets], [t[1] for t in targets]
    batched = timed(lambda ims, ks, _: runner.run_many(ims, ks, seeds=list(range(len(ims)))), images, keys, 0)
    batched /= len(targets)
    result = {
        "device": device_name(device),
        "threads": torch.get_num_threads(), "config": vars(args),
        "ours_s_per_image": round(ours, 3), "ours_images_per_s": round(1 / ours, 3),
        "reference_s_per_image": round(ref, 3), "reference_images_per_s": round(1 / ref, 3),
        "speedup_vs_reference": round(ref / ours, 2),
        "batched_s_per_image": round(batched, 3), "batched_speedup_vs_one_by_one": round(ours / batched, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
