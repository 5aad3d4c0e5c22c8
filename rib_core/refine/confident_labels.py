"""Confident foreground / background labels for IRN (RIB's ``step/cam_to_ir_label.py``).

A map's seed at a high threshold gives confident foreground and at a low one confident background,
each refined by a dense CRF; pixels in between are left for IRN to decide (label 255).
"""

from __future__ import annotations

import numpy as np

from rib_core.classifier.cam import LocalizationMap
from rib_core.config.stage_configs import ConfidentLabelConfig
from rib_core.data.classes import IGNORE_INDEX
from rib_core.refine.crf import crf_seed


def confident_labels(image_uint8: np.ndarray, lmap: LocalizationMap, cfg: ConfidentLabelConfig | None = None,
                     ) -> np.ndarray:
    """IRN's training labels: CRF'd seed at the fg threshold, background only where the CRF'd
    seed at the bg threshold is background too, 255 in between."""
    cfg = cfg or ConfidentLabelConfig()
    fg = crf_seed(image_uint8, lmap, cfg.fg_threshold, cfg.crf)
    bg = crf_seed(image_uint8, lmap, cfg.bg_threshold, cfg.crf)
    out = np.where(fg == 0, IGNORE_INDEX, fg)
    out[(fg == 0) & (bg == 0)] = 0
    return out.astype(np.uint8)
