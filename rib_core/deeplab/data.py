"""DeepLab's training data and loss (deeplab-pytorch ``main.py`` and ``libs/datasets/base.py``):
random scale / crop (labels padded with 255) / flip, and cross-entropy ignoring 255 on each
multi-scale output."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

import rib_core.training.augment as augment
from rib_core.config.network_configs import DeepLabTrainConfig
from rib_core.data.classes import IGNORE_INDEX
from rib_core.data.datasets import Manifest, ManifestRecord, load_image, load_mask
from rib_core.training.loop import AugmentedManifest


class SegmentationTrainSet(AugmentedManifest):
    """Images with their pseudo-masks, deeplab-pytorch's training augmentation.

    Random scale from ``scales`` (image bicubic, mask nearest), normalise, random crop with the
    image padded by its mean (0 after normalising) and the mask by 255, random flip.
    """

    def __init__(self, manifest: Manifest, cfg: DeepLabTrainConfig) -> None:
        unlabelled = [r.id for r in manifest.records if r.mask is None]
        if unlabelled:
            raise ValueError(f"{len(unlabelled)} image(s) have no mask to train on, e.g. {unlabelled[:3]}")
        super().__init__(manifest, cfg.seed)
        self.cfg = cfg

    def sample(self, r: ManifestRecord, rng: random.Random) -> dict[str, torch.Tensor]:
        img = load_image(self.manifest.image_uri(r))
        label = load_mask(self.manifest.mask_uri(r))
        if img.shape[:2] != label.shape:
            raise ValueError(f"{r.id}: image is {img.shape[:2]} but its mask is {label.shape}")
        scale = rng.choice(self.cfg.scales)
        img, label = augment.rescale(img, scale), augment.rescale(label, scale, nearest=True)
        x, label = augment.crop((augment.normalize(img), label), self.cfg.crop_size, (0.0, IGNORE_INDEX), rng)
        if self.cfg.hflip:
            x, label = augment.random_lr_flip((x, label), rng)
        return {"img": augment.to_chw(x), "label": torch.from_numpy(label.astype(np.int64))}


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Labels [B, H, W] to ``size`` by PIL nearest, as deeplab-pytorch's ``resize_labels`` (it notes
    that F.interpolate's nearest misaligns them)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return torch.stack([torch.from_numpy(np.array(augment.resize(lb.numpy().astype(np.uint8), size, nearest=True)))
                        for lb in labels]).long()


def segmentation_loss(outputs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Sum over the MSC outputs of the cross-entropy (main.py train), 255 ignored.

    Averaged over the valid pixels of the batch, and 0 rather than NaN when there are none.
    """
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for logits in outputs:
        target = resize_labels(labels, tuple(logits.shape[-2:])).to(logits.device)
        ce = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
        total = total + ce / (target != IGNORE_INDEX).sum().clamp_min(1)
    return total
