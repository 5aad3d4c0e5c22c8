"""Confident foreground / background labels for IRN (RIB's ``step/cam_to_ir_label.py``).

A map's seed at a high threshold gives confident foreground and at a low one confident background,
each refined by a dense CRF; pixels in between are left for IRN to decide (label 255).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rib_core.cam import LocalizationMap
from rib_core.classes import IGNORE_INDEX
from rib_core.crf import CrfConfig, crf_seed


class ConfidentLabelConfig(BaseModel):
    """Confident foreground / background labels for IRN (``step/cam_to_ir_label.py``)."""

    model_config = ConfigDict(extra="forbid")

    fg_threshold: float = Field(0.35, gt=0, lt=1)  # RIB run_sample.py --conf_fg_thres 0.35 (IRN: 0.30)
    bg_threshold: float = Field(0.17, gt=0, lt=1)  # RIB run_sample.py --conf_bg_thres 0.17 (IRN: 0.05)
    crf: CrfConfig = Field(default_factory=CrfConfig)  # crf_inference_label with its defaults

    @model_validator(mode="after")
    def _ordered(self) -> ConfidentLabelConfig:
        if self.bg_threshold >= self.fg_threshold:
            raise ValueError("bg_threshold must be below fg_threshold")
        return self


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
