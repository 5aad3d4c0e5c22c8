"""How good is the classifier? AP per class, mAP and F1 on a labelled manifest, and its record.

Every stage after the classifier (CAM, RIB, the refinement) is bounded by it: a classifier that
cannot tell which digits are in a scene cannot localise them. This module scores a classifier on
the image-level labels of a manifest (logits of the whole image, the way CAM sees it) and reads
back what a checkpoint recorded about itself, so that every stage can say which classifier it
starts from and warn when it is weak.

AP of a class is the mean, over its positive images, of the precision among the images ranked at
or above that positive by score (no interpolation; ties keep manifest order). mAP is the mean over
the classes that have a positive. F1 is at the 0.5 sigmoid point, per class and as their mean
(macro) and over all decisions (micro).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rib_core.data.datasets import Manifest, load_image
from rib_core.training.augment import normalize, to_chw
from rib_core.training.checkpoints import load_classifier
from rib_core.training.networks import CamNet

# Below this validation mAP a classifier gets a warning (this project's choice: on the demo data,
# CAM seeds stop improving with the classifier from about here on; issue 13).
WEAK_MAP = 0.80
WEAK_CAUSE = ("the classifier is weak: CAM/RIB masks are bounded by it; train longer, use the from-scratch "
              "recipe (--set recipe=scratch) or ImageNet weights (--set init_weights=...)")


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP of one class from scores and 0/1 labels of the same images; NaN without a positive."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    hits = np.asarray(labels)[order] > 0
    if not hits.any():
        return math.nan
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def _f1(tp: float, fp: float, fn: float) -> float | None:
    return None if tp + fp + fn == 0 else float(2 * tp / (2 * tp + fp + fn))


def classification_scores(logits: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """mAP, per-class AP, F1 at sigmoid 0.5 and the multilabel soft-margin loss of [N, C] logits."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
    ap = [average_precision(logits[:, c], labels[:, c]) for c in range(len(classes))]
    predicted = logits > 0  # sigmoid(x) > 0.5
    positive = labels > 0
    tp = (predicted & positive).sum(0)
    fp = (predicted & ~positive).sum(0)
    fn = (~predicted & positive).sum(0)
    f1 = [_f1(*counts) for counts in zip(tp, fp, fn, strict=True)]
    defined_ap = [a for a in ap if not math.isnan(a)]
    defined_f1 = [f for f in f1 if f is not None]
    loss = F.multilabel_soft_margin_loss(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    return {
        "images": len(logits),
        "loss": loss,
        "map": float(np.mean(defined_ap)) if defined_ap else math.nan,
        "ap": {c: (None if math.isnan(a) else a) for c, a in zip(classes, ap, strict=True)},
        "f1": float(np.mean(defined_f1)) if defined_f1 else math.nan,
        "f1_micro": _f1(tp.sum(), fp.sum(), fn.sum()),
        "f1_per_class": dict(zip(classes, f1, strict=True)),
    }


@torch.no_grad()
def predict_logits(model: CamNet, manifest: Manifest, device: str | torch.device = "cpu",
                   batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Logits of every whole image (no crop, no flip) and the label matrix, both [N, C].

    Runs with the stored batch-norm statistics (``eval``), whatever mode the model was in; images of
    one size go through in batches, others alone (pooling must not see padding).
    """
    was_training = model.training
    model.eval()
    logits, labels, batch = [], [], []

    def flush() -> None:
        if batch:
            logits.append(model.logits(torch.stack(batch).to(device)).float().cpu())
            batch.clear()

    for r in manifest.records:
        x = to_chw(normalize(load_image(manifest.image_uri(r))))
        if batch and (x.shape != batch[0].shape or len(batch) == batch_size):
            flush()
        batch.append(x)
        labels.append(manifest.label_vector(r))
    flush()
    model.train(was_training)
    return torch.cat(logits).numpy(), np.stack(labels)


def evaluate_classifier(model: CamNet, manifest: Manifest, device: str | torch.device = "cpu") -> dict[str, Any]:
    """:func:`classification_scores` of ``model`` on every image of ``manifest``."""
    logits, labels = predict_logits(model, manifest, device)
    return classification_scores(logits, labels, manifest.classes)


def classifier_quality(source: str | os.PathLike[str] | Mapping[str, Any], threshold: float = WEAK_MAP,
                       checkpoint: str | None = None) -> dict[str, Any]:
    """What a classifier recorded about itself: ``source`` is a checkpoint path/URI or its loaded
    ``extra`` (then ``checkpoint`` names it).

    Returns ``{"checkpoint", "val_map", "val_manifest", "threshold", "summary", "warning"}``:
    ``val_map`` is None when nothing was recorded (e.g. IRN's ``res50_cam.pth``; ``rib
    eval-classifier`` measures it), ``warning`` is None unless the recorded mAP is below ``threshold``.
    """
    if isinstance(source, Mapping):
        extra = source
    else:
        checkpoint, extra = str(source), load_classifier(source)[2]
    validation = extra.get("validation") or {}
    val_map, manifest = validation.get("map"), validation.get("manifest")
    name = checkpoint or "the classifier"
    if val_map is None:
        summary = f"{name}: validation mAP not recorded (measure it with rib eval-classifier CKPT MANIFEST)"
    else:
        summary = f"{name}: validation mAP {100 * val_map:.1f}% on {manifest} ({validation.get('images')} images)"
    warning = None
    if val_map is not None and val_map < threshold:
        warning = f"validation mAP {100 * val_map:.1f}% is below {100 * threshold:.0f}%: {WEAK_CAUSE}"
    return {"checkpoint": checkpoint, "val_map": val_map, "val_manifest": manifest, "threshold": threshold,
            "summary": summary, "warning": warning}
