"""RIB's cost model: FLOPs per step and per image against measured time and the device's peak.

FLOPs are counted by PyTorch's ``FlopCounterMode`` on one real run of ``RibRunner`` (forward of
the target's scales and flips and of the companion crops, backward through stages 3-4 and the
classifier); the device's peak is measured in the same run with a large matrix product (float32
on the CPU, bfloat16 on CUDA). The fraction of peak is achieved FLOP/s over that peak. Usage:
``python -m benchmarks.flop_model`` (CPU, small), or at the paper's settings on a GPU:
``python -m benchmarks.flop_model --arch resnet50 --size 500 375 --crop 512 --companions 20
--device cuda``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_rib import device_name, sync, synthetic_pool
from rib_core.networks import CamNet
from rib_core.rib import RibRunner
from rib_core.rib_config import RibConfig

VOC_TRAIN_AUG = 10_582  # images the paper's VOC maps are made for


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, nargs=2, default=[96, 72], metavar=("WIDTH", "HEIGHT"))
    p.add_argument("--crop", type=int, default=96, help="companion crop (px)")
    p.add_argument("--companions", type=int, default=8)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--images", type=int, default=3, help="images timed (after one warm-up image)")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--matmul", type=int, default=0, help="matrix side for the peak (default: 2048 CPU, 8192 CUDA)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = CamNet(args.classes, args.arch).to(device).eval()
    width, height = args.size
    pool = synthetic_pool(32, max(args.size), args.classes, rng)
    cfg = RibConfig(iterations=args.iterations, companions=args.companions, crop_size=args.crop,
                    resize_long=(int(args.crop * 0.625), int(args.crop * 1.25)), margin=1e12, explode_ratio=1.0)
    runner = RibRunner(model, pool, cfg, device)
    images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(args.images + 1)]

    with FlopCounterMode(display=False) as counter:
        runner.run(images[0], [0], cfg.model_copy(update={"iterations": 1}), seed=0)
    flops_step = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        runner.run(images[0], [0], seed=0)  # also the warm-up of the timed runs
    flops_image = counter.get_total_flops()

    times = []
    for i, image in enumerate(images[1:], start=1):
        sync(device)
        started = time.perf_counter()
        runner.run(image, [0], seed=i)
        sync(device)
        times.append(time.perf_counter() - started)
    seconds = float(np.mean(times))
    peak = matmul_peak(device, args.matmul or (8192 if device.type == "cuda" else 2048))
    achieved = flops_image / seconds
    print(json.dumps({
        "device": device_name(device), "threads": torch.get_num_threads(), "config": vars(args),
        "tflop_per_step": round(flops_step / 1e12, 4), "tflop_per_image": round(flops_image / 1e12, 4),
        "seconds_per_image": round(seconds, 3), "images_per_hour": round(3600 / seconds, 1),
        "achieved_tflop_per_s": round(achieved / 1e12, 4),
        "peak_tflop_per_s_matmul": round(peak / 1e12, 4), "peak_dtype": "bf16" if device.type == "cuda" else "fp32",
        "fraction_of_peak": round(achieved / peak, 4),
        "floor_seconds_per_image_at_peak": round(flops_image / peak, 4),
        "projected_hours_for_voc_train_aug": round(VOC_TRAIN_AUG * seconds / 3600, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
