"""One image and its pseudo-mask as the exports read it, and each class region's score.

Kept apart from the formats (:mod:`rib_core.io.exports`) so that a format's code sees only the
checked label map and the scores, never where they came from.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rib_core.data.classes import IGNORE_INDEX
from rib_core.io.localization_map import LocalizationMap
from rib_core.io.storage import read_bytes

ImageUrl = Callable[["MaskedImage"], str]


@dataclass(frozen=True)
class MaskedImage:
    """One image and its pseudo-mask, read only when an export needs it; ``read_map`` gives the
    localization map the mask came from (the scores), ``read_image`` the image's bytes (default:
    read ``image`` as a path or s3:// URI)."""

    id: str
    image: str  # the image's path or URI; its file name is what COCO and Label Studio show
    read_mask: Callable[[], np.ndarray]
    read_map: Callable[[], LocalizationMap] | None = None
    read_image: Callable[[], bytes] | None = None

    @property
    def file_name(self) -> str:
        return posixpath.basename(self.image.rstrip("/")) or self.id

    def image_bytes(self) -> bytes:
        """The image as stored; a clear ValueError when it cannot be read (export without images)."""
        try:
            return self.read_image() if self.read_image is not None else read_bytes(self.image)
        except OSError as e:
            raise ValueError(f"image {self.id!r} cannot be read from {self.image} ({e}): export without "
                             "the images (images=false) or restore it") from e


def checked_mask(item: MaskedImage, n_classes: int) -> np.ndarray:
    """The image's label map; refuses values that are no class of the list (a wrong class list)."""
    mask = np.asarray(item.read_mask())
    if mask.ndim != 2:
        raise ValueError(f"mask of {item.id!r} has shape {mask.shape}; a label map is H x W")
    values = np.unique(mask)
    bad = values[((values < 0) | (values > n_classes)) & (values != IGNORE_INDEX)]
    if bad.size:
        raise ValueError(f"mask of {item.id!r} has values {bad[:5].tolist()} that are no class: the class list "
                         f"has {n_classes} (values 1..{n_classes}, 0 background, {IGNORE_INDEX} ignore)")
    return mask.astype(np.uint8)


def present(mask: np.ndarray) -> list[int]:
    """Class values in the mask, background and ignore left out, ascending."""
    return [int(v) for v in np.unique(mask) if 0 < v != IGNORE_INDEX]


def region_scores(mask: np.ndarray, lmap: LocalizationMap | None) -> dict[int, float]:
    """Each class region's score (value -> score in [0, 1]): the localization map's mean inside it.

    The map and not a confidence of the mask: the pseudo-masks (seed + CRF, IRN's walk) are hard
    labels with no per-pixel confidence, while M, what they grew from, is normalised per class to a
    maximum of 1, so its mean over a region is high where the region sits on its class's strong
    evidence and low where the refinement spread the label over weak evidence: the order in which
    COCOeval ranks results and a Label Studio reviewer sorts tasks. A class the map has no channel
    for (not among the image's labels) scores 0. Without a map (ground truth, a manifest's masks)
    every region scores 1: nothing ranks them, and COCOeval's results need a score.
    """
    values = present(mask)
    if lmap is None:
        return dict.fromkeys(values, 1.0)
    if lmap.high_res.shape[1:] != mask.shape:
        raise ValueError(f"the map is {lmap.high_res.shape[1:]} but the mask {mask.shape}: not the same image")
    channel = {int(k) + 1: c for c, k in enumerate(lmap.keys)}
    return {v: round(float(np.clip(lmap.high_res[channel[v]][mask == v].mean(), 0, 1)), 4) if v in channel else 0.0
            for v in values}


def scored(item: MaskedImage, n_classes: int) -> tuple[np.ndarray, dict[int, float]]:
    mask = checked_mask(item, n_classes)
    try:
        return mask, region_scores(mask, item.read_map() if item.read_map is not None else None)
    except ValueError as e:
        raise ValueError(f"image {item.id!r}: {e}") from e
