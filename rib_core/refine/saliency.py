"""RIB-Sal (paper section 3.3): saliency maps veto the pixels of a pseudo-mask they disagree with.

The official code has no saliency step; the threshold is this project's choice.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from rib_core.data.classes import IGNORE_INDEX


def decode_saliency(data: bytes) -> np.ndarray:
    """A saliency PNG (any mode) -> uint8 [H, W], 0..255."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L"))


def apply_saliency(mask: np.ndarray, saliency: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Ignore (255) pixels where mask and saliency disagree: fg in the mask but not salient, or
    background in the mask but salient."""
    if saliency.shape != mask.shape:
        raise ValueError(f"saliency map is {saliency.shape} but the mask is {mask.shape}")
    salient = saliency.astype(np.float32) > threshold * 255
    fg = (mask > 0) & (mask != IGNORE_INDEX)
    out = mask.copy()
    out[(fg & ~salient) | ((mask == 0) & salient)] = IGNORE_INDEX
    return out
