"""Scores of maps and masks, as IRN and the RIB authors compute them.

mIoU comes from one confusion matrix accumulated over the whole set (IRN's ``step/eval_cam.py``
via chainercv), ignoring label 255. Seeds are scored over a sweep of background thresholds and the
best is reported, as the paper does following SEAM (section 4.2.1). Precision and recall (paper
Table 6) are means over the foreground classes of per-class TP/(TP+FP) and TP/(TP+FN); F1 is their
harmonic mean, which reproduces the F1 column of Table 6 from its P and R columns.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rib_core.config.stage_configs import EvalConfig
from rib_core.data.classes import IGNORE_INDEX
from rib_core.data.datasets import Manifest, load_mask
from rib_core.io.localization_map import LocalizationMap


def confusion(pred: np.ndarray, gt: np.ndarray, n_labels: int) -> np.ndarray:
    """[n, n] counts, rows ground truth, columns prediction; gt == 255 is ignored."""
    valid = gt != IGNORE_INDEX
    idx = gt[valid].astype(np.int64) * n_labels + pred[valid].astype(np.int64)
    return np.bincount(idx, minlength=n_labels * n_labels).reshape(n_labels, n_labels)


def _mean_defined(values: np.ndarray) -> float:
    """Mean over the defined (non-NaN) entries; NaN when there are none (e.g. nothing predicted)."""
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if len(defined) else float("nan")


def scores(conf: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU, per-class IoU and foreground precision / recall / F1 from a confusion matrix."""
    conf = conf.astype(np.float64)
    tp = np.diag(conf)
    gt = conf.sum(1)
    pr = conf.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (gt + pr - tp)
        precision = tp / pr
        recall = tp / gt
    p, r = _mean_defined(precision[1:]), _mean_defined(recall[1:])
    names = ["background", *(class_names or [str(i) for i in range(1, len(tp))])]
    return {
        "miou": float(np.nanmean(iou)),
        "iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou, strict=True)},
        "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r > 0 else 0.0,
        "pixels": int(conf.sum()),
    }


def seed_from_map(m: LocalizationMap, threshold: float) -> np.ndarray:
    """Label map from a localization map: background where no class beats ``threshold``.

    IRN pads a background channel of value ``threshold`` and takes the argmax, so ties go to
    background.
    """
    if len(m.keys) == 0:
        return np.zeros(m.high_res.shape[1:], np.uint8)
    best = m.high_res.max(0)
    cls = np.asarray(m.keys)[m.high_res.argmax(0)] + 1
    return np.where(best > threshold, cls, 0).astype(np.uint8)


def sweep_seeds(pairs: Iterable[tuple[LocalizationMap, np.ndarray]], n_classes: int,
                cfg: EvalConfig | None = None, class_names: Sequence[str] | None = None,
                ) -> dict[str, Any]:
    """Score the seeds of many maps at every threshold; report the best and the whole curve."""
    cfg = cfg or EvalConfig()
    confs = {t: np.zeros((n_classes + 1,) * 2, np.int64) for t in cfg.thresholds}
    n = 0
    for m, gt in pairs:
        n += 1
        for t in cfg.thresholds:
            confs[t] += confusion(seed_from_map(m, t), gt, n_classes + 1)
    curve = {t: scores(c, class_names) for t, c in confs.items()}
    best_t = max(curve, key=lambda t: curve[t]["miou"])
    return {"images": n, "best_threshold": best_t, "best": curve[best_t],
            "curve": {f"{t:.2f}": v["miou"] for t, v in curve.items()}}


def sweep_folder(maps_dir: str | Path, manifest: Manifest, cfg: EvalConfig | None = None) -> dict[str, Any]:
    """:func:`sweep_seeds` of the maps ``maps_dir/<id>.npz`` of every image of ``manifest`` against its
    ground-truth mask (every record needs one)."""
    maps = Path(maps_dir)
    pairs = ((LocalizationMap.load(maps / f"{r.id}.npz"), load_mask(manifest.mask_uri(r))) for r in manifest.records)
    return sweep_seeds(pairs, len(manifest.classes), cfg, manifest.classes)


def evaluate_masks(pairs: Iterable[tuple[np.ndarray, np.ndarray]], n_classes: int,
                   class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Score label maps (pseudo-masks, predictions) against ground truth."""
    conf = np.zeros((n_classes + 1,) * 2, np.int64)
    n = 0
    for pred, gt in pairs:
        n += 1
        conf += confusion(pred, gt, n_classes + 1)
    return {"images": n, **scores(conf, class_names)}


def all_background_miou(gts: Iterable[np.ndarray], n_classes: int) -> float:
    """The floor every method must clear: predict background everywhere."""
    return evaluate_masks(((np.zeros_like(g), g) for g in gts), n_classes)["miou"]


def write_report(report: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2, sort_keys=True))
