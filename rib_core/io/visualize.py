"""Pictures for people: the VOC palette, label PNGs, heat maps of M and overlays."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from rib_core.data.classes import IGNORE_INDEX


def voc_palette() -> np.ndarray:
    """The 256-entry PASCAL VOC colour map (bit-interleaved class index), 255 -> white-ish."""
    pal = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    pal[IGNORE_INDEX] = (224, 224, 192)  # VOC's colour for 'void'
    return pal


PALETTE = voc_palette()


def label_png(label: np.ndarray) -> bytes:
    """Indexed PNG with the VOC palette: pixel values stay class indices (255 ignore)."""
    im = Image.fromarray(label.astype(np.uint8), mode="P")
    im.putpalette(PALETTE.flatten().tolist())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def colorize_label(label: np.ndarray) -> np.ndarray:
    return PALETTE[label]


def heatmap(score: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> RGB with a blue-to-red ramp (no matplotlib needed)."""
    s = np.clip(score, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * s - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * s - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * s - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def blend(image: np.ndarray, overlay: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return (image.astype(np.float32) * (1 - alpha) + overlay.astype(np.float32) * alpha).astype(np.uint8)


def map_overlay(image: np.ndarray, score: np.ndarray) -> np.ndarray:
    """The image under a heat map of the per-pixel maximum of a localization map."""
    return blend(image, heatmap(score))


def mask_overlay(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """The image under its pseudo-mask's colours; background stays as it is."""
    colour = colorize_label(label)
    out = blend(image, colour, 0.6)
    keep = label == 0
    out[keep] = image[keep]
    return out
