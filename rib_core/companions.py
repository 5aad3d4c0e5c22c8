"""The companion pool: images that RIB mixes into every fine-tuning step.

Paper section 3.2: each RIB step trains on the target image plus other images, so that the
per-image model does not over-fit. The official code (``VOC12RIBDataset`` with ``disjoint_prob``
1) draws them only among images that share no class with the target, shuffled, in batches of
``--RIB_batch`` 20, with the classifier's training augmentation. The pool is built once from a
manifest and kept in memory (decoded images and a class index) for every image a worker processes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from rib_core.datasets import Manifest, augment_crop, load_image


class CompanionPool:
    """Decoded companion images with their multi-hot labels, sampled disjointly from a target."""

    def __init__(self, images: Sequence[np.ndarray], labels: np.ndarray, ids: Sequence[str],
                 classes: Sequence[str]) -> None:
        if len(images) != len(labels) or len(images) != len(ids):
            raise ValueError("images, labels and ids must have the same length")
        self.images = list(images)
        self.labels = np.asarray(labels, dtype=bool)  # [N, C]
        self.ids = list(ids)
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def from_manifest(cls, manifest: Manifest, limit: int | None = None, progress: bool = False,
                      ) -> CompanionPool:
        """Decode every image of ``manifest`` (or the first ``limit``) once."""
        records = manifest.records[:limit] if limit else manifest.records
        images = [load_image(manifest.image_uri(r))
                  for r in tqdm(records, desc="companion pool", disable=not progress, unit="img")]
        labels = np.stack([manifest.label_vector(r).numpy() > 0 for r in records])
        return cls(images, labels, [r.id for r in records], manifest.classes)

    def disjoint_indices(self, keys: Sequence[int]) -> np.ndarray:
        """Images that share no class with ``keys`` (which also excludes the target itself)."""
        if not len(keys):
            return np.arange(len(self))
        return np.flatnonzero(~self.labels[:, list(keys)].any(axis=1))

    def batches(self, keys: Sequence[int], size: int, crop_size: int, resize_long: tuple[int, int],
                rng: random.Random) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless ``(images [size, 3, crop, crop], labels [size, C])`` batches for one target.

        Like the official ``DataLoader(shuffle=True, drop_last=True)``: a shuffled pass over the
        disjoint images, ``size`` at a time. The official loop ends when that pass does; we
        reshuffle instead, and repeat images when fewer than ``size`` exist (VOC never gets there).
        """
        candidates = self.disjoint_indices(keys).tolist()
        if size == 0 or not candidates:
            while True:
                yield (torch.zeros(0, 3, crop_size, crop_size), torch.zeros(0, len(self.classes)))
        order: list[int] = []
        while True:
            while len(order) < size:
                perm = candidates[:]
                rng.shuffle(perm)
                order += perm
            chosen, order = order[:size], order[size:]
            imgs = torch.stack([augment_crop(self.images[i], crop_size, resize_long, True, rng) for i in chosen])
            yield imgs, torch.from_numpy(self.labels[chosen].astype(np.float32))
