"""How far the batched engine's device crops are from IRN's host (PIL) crops at the paper's size.

RIB's companions are crops of 512 px after a random long-side resize to 320-640 px
(``VOC12RIBDataset``). The plain engine makes them with PIL (bicubic, antialiased when shrinking);
the batched engine with one ``grid_sample`` on the device (torch's bicubic, no antialiasing; see
docs/FIDELITY.md). Both follow the same draws (size, flip, box), so the difference is the resampling
alone. This draws companions from demo-style MNIST scenes at VOC's image sizes (500 x 375,
375 x 500, 500 x 500), makes every crop both ways and prints the gap in normalised units (the
networks' input scale: one unit is about 57 grey levels) over the pasted pixels, overall and split
by whether the draw shrank or enlarged the image. Usage:
``python -m benchmarks.bench_device_crops [--images 16] [--rounds 4] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile

import numpy as np
import torch

from rib_core.data.datasets import load_image
from rib_core.data.demo_data import DemoDataConfig, make_demo_dataset
from rib_core.rib.companions import CompanionPool, DeviceCompanions
from rib_core.runtime.provenance import device_name, run_record
from rib_core.training.augment import apply_crop, draw_crop

VOC_SHAPES = ((375, 500), (500, 375), (500, 500))  # the common VOC 2012 image sizes (h, w)


def voc_sized_scenes(n: int, seed: int) -> list[np.ndarray]:
    """Demo scenes on 500 px canvases (digits scaled like the 64 px demo's), cut to VOC's shapes."""
    with tempfile.TemporaryDirectory() as tmp:
        data = make_demo_dataset(tmp, DemoDataConfig(n_train=n, n_val=1, canvas=500, digit_size=(200, 310),
                                                     max_per_image=2, seed=seed))
        images = [load_image(data.train.image_uri(r)) for r in data.train.records]
    return [im[: VOC_SHAPES[j % 3][0], : VOC_SHAPES[j % 3][1]].copy() for j, im in enumerate(images)]


def summary(gap: torch.Tensor) -> dict[str, float]:
    """Mean, percentiles (on a sample of at most 2^24 values: quantile's limit) and max of |gap|."""
    sample = gap[torch.randperm(gap.numel(), generator=torch.Generator().manual_seed(0))[:2**24]]
    return {"values": gap.numel(), "mean": round(gap.mean().item(), 4),
            "p99": round(sample.quantile(0.99).item(), 4), "p999": round(sample.quantile(0.999).item(), 4),
            "max": round(gap.max().item(), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4, help="draws of every image")
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--resize-long", type=int, nargs=2, default=(320, 640))
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    images = voc_sized_scenes(args.images, args.seed)
    pool = CompanionPool(images, np.zeros((len(images), 1), bool), [str(j) for j in range(len(images))], ["c"])
    device = torch.device(args.device)
    on_device = DeviceCompanions(pool, device)
    rng = random.Random(args.seed)
    gaps: dict[str, list[torch.Tensor]] = {"shrunk": [], "enlarged": []}
    for _ in range(args.rounds):
        chosen = list(range(len(images)))
        draws = [draw_crop(images[i].shape[:2], args.crop, tuple(args.resize_long), True, rng) for i in chosen]
        crops, _ = on_device.crops([chosen], [draws])
        for i, d, crop in zip(chosen, draws, crops[0].cpu(), strict=True):
            host = apply_crop(images[i], d)
            pasted = (host != 0).any(0)  # the crop's image pixels; both paths pad with exact zeros
            gap = (crop - host).abs()[:, pasted]
            gaps["shrunk" if max(d.size) < max(images[i].shape[:2]) else "enlarged"].append(gap.flatten())
    every = torch.cat([g for parts in gaps.values() for g in parts])
    out = {"run": run_record(device), "device": device_name(device),
           "images": len(images), "crops": args.rounds * len(images),
           "crop": args.crop, "resize_long": list(args.resize_long), "units": "normalised: (x / 255 - mean) / std",
           "all": summary(every), **{k: summary(torch.cat(v)) for k, v in gaps.items() if v}}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
