"""The classifier's training samples (torch): IRN's ``VOC12ClassificationDataset`` recipe on a manifest."""

from __future__ import annotations

import random
from typing import Any

import torch

import rib_core.training.augment as augment
from rib_core.data.datasets import Manifest, ManifestRecord, load_image
from rib_core.training.loop import AugmentedManifest


class ClassificationDataset(AugmentedManifest):
    """Training samples for the classifier, IRN's ``VOC12ClassificationDataset`` recipe.

    Random resize-long, normalise, random flip, random crop padded with 0 (the mean after
    normalisation), in that order as in IRN's ``voc12/dataloader.py``.
    """

    def __init__(self, manifest: Manifest, crop_size: int, resize_long: tuple[int, int] | None,
                 hflip: bool = True, seed: int = 0) -> None:
        super().__init__(manifest, seed)
        self.crop_size = crop_size
        self.resize_long = resize_long
        self.hflip = hflip

    def sample(self, r: ManifestRecord, rng: random.Random) -> dict[str, Any]:
        img = load_image(self.manifest.image_uri(r))
        draw = augment.draw_crop(img.shape[:2], self.crop_size, self.resize_long, self.hflip, rng)
        label = torch.from_numpy(self.manifest.label_vector(r))
        return {"id": r.id, "img": augment.apply_crop(img, draw), "label": label}

