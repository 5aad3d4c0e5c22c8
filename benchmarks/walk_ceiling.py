"""The most any stride-4 map can score once upsampled as IRN's walk is: each true mask averaged
over 4x4 cells (a perfect stride-4 map), upsampled by :func:`~rib_core.refine.random_walk.to_image_size`
and arg-maxed. When IRN's masks lie far below it, the walk's resolution is not what holds them back.

    python -m benchmarks.walk_ceiling runs/study_demo/data/train.jsonl --first 200 --count 40

(the study at size's held-out images). No network is involved; it takes seconds.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from rib_core.data.datasets import Manifest, load_manifest, load_mask
from rib_core.data.evaluation import confusion, scores
from rib_core.refine.random_walk import to_image_size


def stride4_ceiling(manifest: Manifest, ids: list[str]) -> float:
    """mIoU of the perfect stride-4 maps of ``ids``' true masks, at full size (ignored pixels count as background
    in the map and are left out of the score)."""
    n = len(manifest.classes) + 1
    conf = np.zeros((n, n), np.int64)
    for image_id in ids:
        gt = load_mask(manifest.mask_uri(manifest.by_id(image_id)))
        labels = torch.from_numpy(np.where(gt == 255, 0, gt).astype(np.int64))
        onehot = F.one_hot(labels, n).permute(2, 0, 1).float()
        cells = F.avg_pool2d(onehot[None], 4, 4, ceil_mode=True)[0]
        conf += confusion(to_image_size(cells, gt.shape).argmax(0).numpy(), gt, n)
    return float(scores(conf)["miou"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("manifest", help="a manifest with true masks")
    p.add_argument("--first", type=int, default=0, help="records to skip")
    p.add_argument("--count", type=int, default=None, help="records to score (default: the rest)")
    args = p.parse_args()
    manifest = load_manifest(args.manifest)
    end = None if args.count is None else args.first + args.count
    ids = [r.id for r in manifest.records[args.first:end]]
    print(f"{args.manifest}: {len(ids)} images, stride-4 ceiling mIoU {100 * stride4_ceiling(manifest, ids):.1f}")


if __name__ == "__main__":
    main()
