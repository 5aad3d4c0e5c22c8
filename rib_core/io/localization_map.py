"""The localization map file format, torch-free (the API process reads maps for exports' scores).

A localization map, CAM or RIB's M, is stored the way IRN stores it: the classes present in the
image (``keys``, indices into the class list), the map at stride 4 (``cam``) and at full resolution
(``high_res``), each normalised per class by its maximum. We write ``.npz`` instead of IRN's pickled
``.npy`` dict, so that loading a map never runs code.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class LocalizationMap:
    """Per-class maps of one image, normalised per class to a maximum of (almost) 1."""

    keys: np.ndarray       # [K] class indices (0-based, no background) present in the image
    cam: np.ndarray        # [K, ceil(H/4), ceil(W/4)] float32, stride 4
    high_res: np.ndarray   # [K, H, W] float32, full resolution

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez_compressed(buf, keys=self.keys, cam=self.cam, high_res=self.high_res)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> LocalizationMap:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(z["keys"], z["cam"], z["high_res"])

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LocalizationMap:
        return cls.from_bytes(Path(path).read_bytes())
