"""A trained DeepLab at test time (deeplab-pytorch ``main.py test`` and ``crf``): class
probabilities over scales and flips, label maps with an optional dense CRF, mIoU against ground
truth, and masks written to storage."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import rib_core.training.augment as augment
from rib_core.config.network_configs import DeepLabTrainConfig
from rib_core.data.datasets import Manifest, load_image, load_mask
from rib_core.data.evaluation import confusion, evaluate_masks, scores
from rib_core.deeplab.model import DeepLab
from rib_core.io.storage import Storage
from rib_core.io.visualize import label_png
from rib_core.refine.crf import crf_probabilities
from rib_core.training.loop import autocast


@torch.no_grad()
def predict_probs(model: DeepLab, image_uint8: np.ndarray, cfg: DeepLabTrainConfig | None = None,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """Class probabilities [K + 1, H, W] of one image: the fused (MSC) logits, upsampled bilinearly
    to the image (main.py test), softmax; averaged over ``test_scales`` and, if set, flips."""
    cfg = cfg or DeepLabTrainConfig()
    model.eval()
    size = image_uint8.shape[:2]
    total = None
    for batch in augment.multiscale_flip_batches(image_uint8, tuple(cfg.test_scales)):
        x = (batch if cfg.test_flip else batch[:1]).to(device)
        with autocast(cfg.amp, torch.device(device)):
            logits = model(x)[-1].float()
        probs = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).softmax(1)
        if cfg.test_flip:
            probs = torch.stack([probs[0], probs[1].flip(-1)])
        total = probs.sum(0) if total is None else total + probs.sum(0)
    return (total / (len(cfg.test_scales) * (2 if cfg.test_flip else 1))).cpu().numpy()


def predict_mask(model: DeepLab, image_uint8: np.ndarray, cfg: DeepLabTrainConfig | None = None,
                 device: str | torch.device = "cpu") -> np.ndarray:
    """Label map (0 background, i + 1 class i) of one image; dense CRF on the probabilities if
    ``use_crf``."""
    cfg = cfg or DeepLabTrainConfig()
    probs = predict_probs(model, image_uint8, cfg, device)
    if cfg.use_crf:
        return crf_probabilities(image_uint8, probs, cfg.crf).astype(np.uint8)
    return probs.argmax(0).astype(np.uint8)


def evaluate(model: DeepLab, manifest: Manifest, cfg: DeepLabTrainConfig | None = None,
             device: str | torch.device = "cpu", progress: bool = True) -> dict[str, Any]:
    """mIoU (with per-class IoU, precision, recall) on the manifest's ground-truth masks, with the
    all-background floor for comparison."""
    cfg = cfg or DeepLabTrainConfig()
    records = [r for r in manifest.records if r.mask is not None]
    if not records:
        raise ValueError("the manifest has no ground-truth masks to evaluate against")
    model.to(device)
    n_labels = len(manifest.classes) + 1
    floor = np.zeros((n_labels, n_labels), np.int64)  # confusion of predicting background everywhere

    def pairs() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        nonlocal floor
        for r in tqdm(records, desc="evaluate deeplab", unit="img", disable=not progress):
            gt = load_mask(manifest.mask_uri(r))
            floor += confusion(np.zeros_like(gt), gt, n_labels)
            yield predict_mask(model, load_image(manifest.image_uri(r)), cfg, device), gt

    report = evaluate_masks(pairs(), len(manifest.classes), manifest.classes)
    report["all_background_miou"] = scores(floor)["miou"]
    report["test_scales"], report["test_flip"], report["crf"] = cfg.test_scales, cfg.test_flip, cfg.use_crf
    return report


def predict_to(model: DeepLab, manifest: Manifest, storage: Storage, cfg: DeepLabTrainConfig | None = None,
               device: str | torch.device = "cpu", prefix: str = "masks", progress: bool = True,
               records: list[Any] | None = None) -> list[str]:
    """Write ``prefix/<id>.png`` (VOC palette, class indices) for each image; returns the keys."""
    cfg = cfg or DeepLabTrainConfig()
    model.to(device)
    keys = []
    for r in tqdm(manifest.records if records is None else records, desc="predict deeplab", unit="img",
                  disable=not progress):
        key = f"{prefix}/{r.id}.png"
        storage.put(key, label_png(predict_mask(model, load_image(manifest.image_uri(r)), cfg, device)), "image/png")
        keys.append(key)
    return keys
