"""RIB's speed in one command: FLOPs, time per image for each path, the device's peak, and ratios.

Everything comes from one run on one device:
- FLOPs per RIB step and per image, counted by PyTorch's ``FlopCounterMode`` on a real run of the
  plain path (forward of the target's scales and flips and of the companion crops, backward
  through stages 3-4 and the classifier). The batched path does the same arithmetic.
- Seconds per image of: the plain reference of the official loop (``tests/rib_reference.py``), our
  plain path (``RibRunner.run``, float32), the batched path (``RibBatcher`` over
  ``RibRunner.run_many``: several images per step, companions cropped on the device, bfloat16 on
  CUDA), and the default path, which is what the workers run on this device (``RibConfig()``'s
  engine and precision: batched + bf16 on CUDA, plain + fp32 on the CPU).
- Times are medians over ``--rounds`` rounds that interleave the paths.
- The peak: the best of three runs of a large matrix product (float32 on the CPU, bfloat16 on
  CUDA); the fraction of peak is the default path's achieved FLOP/s over it; the projection is
  for the 10,582 VOC images.

Every path runs all K steps (no early stop) on the same images with the same companion draws.
Usage: ``python -m benchmarks.bench_rib`` (CPU, small), or at the paper's settings on a GPU:
``python -m benchmarks.bench_rib --arch resnet50 --size 500 375 --crop 512 --companions 20
--images 16 --device cuda``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from rib_core.config.rib_config import RibConfig
from rib_core.rib.batching import RibBatcher
from rib_core.rib.companions import CompanionPool
from rib_core.rib.process import RibRunner
from rib_core.runtime.provenance import device_name, run_record
from rib_core.training.networks import CamNet
from tests.rib_reference import reference_rib

VOC_TRAIN_AUG = 10_582  # images the paper's VOC maps are made for


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


def matmul_peak(device: torch.device, n: int, repeats: int = 5) -> float:
    """FLOP/s of an n x n matrix product: bfloat16 on CUDA, float32 on the CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - started)


def rib_flops(runner: RibRunner, image: np.ndarray, keys: list[int], cfg: RibConfig) -> tuple[float, float]:
    """FLOPs of one RIB step and of one image (all ``cfg.iterations`` steps) on the plain path,
    counted by ``FlopCounterMode`` on two real runs (1 step, then all): a step is the target's CAM
    at every scale and the companions, forward and backward; the rest of an image's count is one-off
    (the target's stage 1-2 features). ``cfg`` should not stop early (huge margin, no explosion)."""
    with FlopCounterMode(display=False) as counter:
        runner.run(image, keys, cfg.model_copy(update={"iterations": 1}), seed=0)
    flops_one_step = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        runner.run(image, keys, cfg, seed=0)
    flops_image = counter.get_total_flops()
    flops_step = (flops_image - flops_one_step) / (cfg.iterations - 1) if cfg.iterations > 1 else flops_one_step
    return flops_step, flops_image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, nargs=2, default=[96, 72], metavar=("WIDTH", "HEIGHT"))
    p.add_argument("--crop", type=int, default=96, help="companion crop (px)")
    p.add_argument("--companions", type=int, default=8)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--images", type=int, default=4, help="images timed per path (after a warm-up)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per path (median reported)")
    p.add_argument("--batch", type=int, default=0, help="images per batched step (0: from free memory "
                   "on CUDA; on the CPU all --images)")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--compile", action="store_true", help="torch.compile the batched path")
    p.add_argument("--no-reference", action="store_true", help="skip the official-structure loop")
    p.add_argument("--matmul", type=int, default=0, help="matrix side for the peak (default: 2048 CPU, 8192 CUDA)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = CamNet(args.classes, args.arch).to(device).eval()
    width, height = args.size
    pool = synthetic_pool(64, max(args.size), args.classes, rng)
    default = RibConfig(iterations=args.iterations, companions=args.companions, crop_size=args.crop,
                        resize_long=(int(args.crop * 0.625), int(args.crop * 1.25)), margin=1e12, explode_ratio=1.0,
                        max_images_per_batch=args.batch or (0 if device.type == "cuda" else args.images),
                        compile=args.compile)
    plain = default.model_copy(update={"engine": "plain", "precision": "fp32"})
    batched = default.model_copy(update={"engine": "batched"})
    runner = RibRunner(model, pool, plain, device)
    batcher = RibBatcher(runner)
    images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(args.images)]
    keys = [[j % args.classes] for j in range(args.images)]
    seeds = list(range(args.images))

    flops_step, flops_image = rib_flops(runner, images[0], keys[0], plain)  # also the plain path's warm-up

    def per_image(fn: Callable[[], object], count: int = args.images) -> float:
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        return (time.perf_counter() - started) / count

    same_as_plain = not default.batched(str(device)) and not default.uses_bf16(str(device))
    paths: dict[str, Callable[[], object]] = {
        "plain": lambda: [runner.run(im, k, plain, s) for im, k, s in zip(images, keys, seeds, strict=True)],
        "batched": lambda: batcher.run_all(images, keys, batched, seeds),
    }
    if not same_as_plain:  # on the CPU the default is the plain path: timed once
        paths["default"] = lambda: batcher.run_all(images, keys, default, seeds)
    if not args.no_reference:
        paths["reference"] = lambda: [reference_rib(model, pool, im, k, plain, s, device)
                                      for im, k, s in zip(images, keys, seeds, strict=True)]
    batcher.run_all(images[:1], keys[:1], batched, seeds[:1])  # warm-up: kernels, memory measurement
    batcher.run_all(images, keys, batched, seeds)              # (and compilation with --compile)
    rounds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):  # interleaved, so a slow spell of the machine hits every path
        for name, fn in paths.items():
            rounds[name].append(per_image(fn))
    seconds = {name: float(np.median(times)) for name, times in rounds.items()}
    if same_as_plain:
        seconds["default"] = seconds["plain"]
    peak = max(matmul_peak(device, args.matmul or (8192 if device.type == "cuda" else 2048)) for _ in range(3))
    fast = seconds["default"]
    result = {
        "run": run_record(device),
        "device": device_name(device), "threads": torch.get_num_threads(), "config": vars(args),
        "default_path": ("batched" if default.batched(str(device)) else "plain")
                        + (", bf16" if default.uses_bf16(str(device)) else ", fp32")
                        + (" (the plain path's figures)" if same_as_plain else ""),
        "images_per_batched_step": batcher.images_per_batch((height, width, 3), batched, batched.plan(str(device)),
                                                            args.images),
        "tflop_per_step": round(flops_step / 1e12, 4), "tflop_per_image": round(flops_image / 1e12, 4),
        "tflop_one_off_per_image": round((flops_image - args.iterations * flops_step) / 1e12, 4),
        "seconds_per_image": {name: round(s, 4) for name, s in seconds.items()},
        "images_per_hour": {name: round(3600 / s, 1) for name, s in seconds.items()},
        "speedup_default_vs_reference": round(seconds["reference"] / fast, 2) if "reference" in seconds else None,
        "speedup_default_vs_plain": round(seconds["plain"] / fast, 2),
        "speedup_batched_vs_plain": round(seconds["plain"] / seconds["batched"], 2),
        "achieved_tflop_per_s": round(flops_image / fast / 1e12, 4),
        "peak_tflop_per_s_matmul": round(peak / 1e12, 4), "peak_dtype": "bf16" if device.type == "cuda" else "fp32",
        "fraction_of_peak": round(flops_image / fast / peak, 4),
        "floor_seconds_per_image_at_peak": round(flops_image / peak, 4),
        "projected_hours_for_voc_train_aug": round(VOC_TRAIN_AUG * fast / 3600, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
