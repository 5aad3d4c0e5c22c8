"""The companion pool: images that RIB mixes into every fine-tuning step.

Paper section 3.2: each RIB step trains on the target image plus other images, so that the
per-image model does not over-fit. The official code (``VOC12RIBDataset`` with ``disjoint_prob``
1) draws them only among images that share no class with the target, shuffled, in batches of
``--RIB_batch`` 20, with the classifier's training augmentation. The pool is built once from a
manifest and kept in memory (decoded images and a class index) for every image a worker processes.

The batched RIB path keeps the pool on the device instead (:class:`DeviceCompanions`): every
image decoded once into one uint8 tensor, and each step's crops made there in one batched call.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from rib_core.augment import CropDraw, apply_crop, crops_on_device, draw_crop
from rib_core.datasets import Manifest, load_image


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
        labels = np.stack([manifest.label_vector(r) > 0 for r in records])
        return cls(images, labels, [r.id for r in records], manifest.classes)

    def disjoint_indices(self, keys: Sequence[int]) -> np.ndarray:
        """Images that share no class with ``keys`` (which also excludes the target itself)."""
        if not len(keys):
            return np.arange(len(self))
        return np.flatnonzero(~self.labels[:, list(keys)].any(axis=1))

    def draws(self, keys: Sequence[int], size: int, crop_size: int, resize_long: tuple[int, int],
              rng: random.Random) -> Iterator[tuple[list[int], list[CropDraw]]]:
        """Endless ``(pool indices, crop draws)`` of ``size`` companions per step for one target.

        Like the official ``DataLoader(shuffle=True, drop_last=True)``: a shuffled pass over the
        disjoint images, ``size`` at a time. The official loop ends when that pass does; we
        reshuffle instead, and repeat images when fewer than ``size`` exist (VOC never gets there).
        No companion (``size`` 0, or none disjoint) gives empty lists.
        """
        candidates = self.disjoint_indices(keys).tolist()
        if size == 0 or not candidates:
            while True:
                yield [], []
        order: list[int] = []
        while True:
            while len(order) < size:
                perm = candidates[:]
                rng.shuffle(perm)
                order += perm
            chosen, order = order[:size], order[size:]
            yield chosen, [draw_crop(self.images[i].shape[:2], crop_size, resize_long, True, rng) for i in chosen]

    def batches(self, keys: Sequence[int], size: int, crop_size: int, resize_long: tuple[int, int],
                rng: random.Random) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless ``(images [size, 3, crop, crop], labels [size, C])`` batches for one target,
        augmented on the host one image at a time (IRN's PIL path)."""
        for chosen, crops in self.draws(keys, size, crop_size, resize_long, rng):
            if not chosen:
                yield torch.zeros(0, 3, crop_size, crop_size), torch.zeros(0, len(self.classes))
                continue
            imgs = torch.stack([apply_crop(self.images[i], d) for i, d in zip(chosen, crops, strict=True)])
            yield imgs, torch.from_numpy(self.labels[chosen].astype(np.float32))


class DeviceCompanions:
    """A :class:`CompanionPool` decoded once into device memory, for batched crops.

    The images sit back to back in one flat uint8 tensor (no padding to a common size); a step
    gathers its companions into one edge-padded batch with a single index, then
    :func:`~rib_core.augment.crops_on_device` resizes, flips and crops them all at once. Where the
    pool does not fit on the device, the tensor stays in pinned host memory and only the gathered
    uint8 batch is copied, asynchronously.
    """

    def __init__(self, pool: CompanionPool, device: torch.device, max_device_bytes: int | None = None) -> None:
        self.device = device
        sizes = np.array([im.shape[:2] for im in pool.images], dtype=np.int64).reshape(-1, 2)
        pixels = sizes[:, 0] * sizes[:, 1]
        fits = max_device_bytes is None or 3 * int(pixels.sum()) <= max_device_bytes
        home = device if fits else torch.device("cpu")
        flat = torch.from_numpy(np.concatenate([im.reshape(-1, 3) for im in pool.images])) if len(pool) \
            else torch.zeros(0, 3, dtype=torch.uint8)
        if home.type == "cpu" and device.type == "cuda":
            flat = flat.pin_memory()
        self.pixels = flat.to(home)                                    # [sum of h*w, 3] uint8
        self.home = home
        self.offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(pixels)[:-1]])).to(home)
        self.host_sizes = sizes                                        # [N, 2] (h, w), read without a sync
        self.sizes = torch.from_numpy(sizes).to(home)
        self.labels = torch.from_numpy(pool.labels.astype(np.float32)).to(device)

    def crops(self, chosen: list[list[int]], draws: list[list[CropDraw]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's companions for n targets: ([n, k, 3, crop, crop] float, [n, k, C] labels)."""
        n, k = len(chosen), len(chosen[0])
        ids = [i for row in chosen for i in row]
        index = torch.tensor(ids, dtype=torch.long, device=self.home)
        sizes = self.sizes[index]
        height, width = (int(v) for v in self.host_sizes[ids].max(axis=0))
        ys = torch.arange(height, device=self.home)[None, :, None].minimum(sizes[:, 0, None, None] - 1)
        xs = torch.arange(width, device=self.home)[None, None, :].minimum(sizes[:, 1, None, None] - 1)
        flat = self.offsets[index, None, None] + ys * sizes[:, 1, None, None] + xs
        batch = self.pixels[flat].to(self.device, non_blocking=True)  # [n*k, H, W, 3], edges repeated
        x = crops_on_device(batch, sizes.to(self.device), [d for row in draws for d in row])
        return x.unflatten(0, (n, k)), self.labels[index.to(self.device)].unflatten(0, (n, k))
