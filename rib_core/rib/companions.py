"""The companion pool: images that RIB mixes into every fine-tuning step.

Paper section 3.2: each RIB step trains on the target image plus other images, so that the
per-image model does not over-fit. The official code (``VOC12RIBDataset`` with ``disjoint_prob``
1) draws them only among images that share no class with the target, shuffled, in batches of
``--RIB_batch`` 20, with the classifier's training augmentation.

The pool is an index of the data set, not a copy of it: ids, labels and image locations in
memory, images decoded on demand into a cache bounded in bytes, like the official code's lazy
DataLoader. A data set of any size costs the index plus the bound. Image sizes (which the crop draws
need) are learnt as each image is first drawn, so the draws are those of a fully decoded pool.
:meth:`CompanionPool.ahead` runs the next step's draws and decoding on a background thread while the
current RIB step computes. :data:`POOLS` keeps one pool per data set for the whole process.

The batched RIB path uploads each step's companions to the device as one uint8 batch
(:class:`DeviceCompanions`) and crops them there in one batched call.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import TypeVar

import numpy as np
import torch

from rib_core.data.datasets import Manifest, decode_image
from rib_core.io.storage import ObjectReader
from rib_core.training.augment import CropDraw, apply_crop, crops_on_device, draw_crop

T = TypeVar("T")

# 512 MiB of decoded images: about 950 VOC-size images (500x375x3 = 0.56 MB each), some 47 steps of
# the official 20 companions, while a step needs 20 and the prefetch one step more. Small data sets
# (the demo, the tests) stay decoded whole; a worker's RIB step on a ResNet-50 takes several GB
# beside it; and it is the same whatever the data set's size.
DEFAULT_CACHE_BYTES = 512 * 2**20
POOLS_KEPT = 2  # data sets whose pools a process keeps (each up to its cache bound) before dropping the oldest


class ImageCache:
    """Decoded images by pool index, least recently used out first, never over ``bound`` bytes
    (an image larger than the bound is returned and not kept). Safe to share between threads."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.nbytes = 0
        self.decodes = 0  # images decoded into the cache, repeats after an eviction included
        self.load_seconds = 0.0  # spent reading and decoding them, on whichever thread asked
        self._items: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: int, load: Callable[[], np.ndarray]) -> np.ndarray:
        """The image at ``key``, loaded (outside the lock, so threads decode in parallel) if absent."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        started = time.perf_counter()
        image = load()
        with self._lock:
            self.decodes += 1
            self.load_seconds += time.perf_counter() - started
            if key not in self._items and image.nbytes <= self.bound:
                while self.nbytes + image.nbytes > self.bound:
                    self.nbytes -= self._items.popitem(last=False)[1].nbytes
                self._items[key] = image
                self.nbytes += image.nbytes
        return image


class CompanionPool:
    """Companion images with their multi-hot labels, sampled disjointly from a target.

    ``images`` holds, per image, either a decoded uint8 HxWx3 array (kept as given: the caller's
    memory) or a path / s3:// URI read through ``reader`` and decoded on demand into a cache of at
    most ``cache_bytes``. ``prefetch`` False makes :meth:`ahead` run the steps inline (the benchmark's
    baseline).
    """

    def __init__(self, images: Sequence[np.ndarray | str], labels: np.ndarray, ids: Sequence[str],
                 classes: Sequence[str], cache_bytes: int = DEFAULT_CACHE_BYTES, reader: ObjectReader | None = None,
                 prefetch: bool = True) -> None:
        if len(images) != len(labels) or len(images) != len(ids):
            raise ValueError("images, labels and ids must have the same length")
        self.sources = list(images)
        self.labels = np.asarray(labels, dtype=bool)  # [N, C]
        self.ids = list(ids)
        self.classes = list(classes)
        self.cache = ImageCache(cache_bytes)
        self.reader = reader or ObjectReader()
        self.prefetch = prefetch
        self._sizes = np.full((len(self.sources), 2), -1, dtype=np.int64)  # (h, w), known once drawn
        for i, source in enumerate(self.sources):
            if isinstance(source, np.ndarray):
                self._sizes[i] = source.shape[:2]

    def __len__(self) -> int:
        return len(self.sources)

    @classmethod
    def from_manifest(cls, manifest: Manifest, limit: int | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
                      disk_cache: str | os.PathLike[str] | None = None) -> CompanionPool:
        """The index of ``manifest`` (or its first ``limit`` images); nothing is read yet. ``disk_cache``
        keeps the s3:// images fetched, in that folder (:class:`~rib_core.io.storage.ObjectReader`)."""
        if limit:
            manifest = Manifest(manifest.classes, manifest.records[:limit], manifest.base)
        return cls([manifest.image_uri(r) for r in manifest.records], manifest.label_matrix(),
                   [r.id for r in manifest.records], manifest.classes, cache_bytes, ObjectReader(disk_cache))

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 HxWx3, from the cache or read and decoded now."""
        source = self.sources[i]
        if isinstance(source, np.ndarray):
            return source
        image = self.cache.get(i, lambda: decode_image(self.reader.read(source)))
        self._sizes[i] = image.shape[:2]
        return image

    def size(self, i: int) -> tuple[int, int]:
        """(h, w) of image ``i``; decodes it the first time (a drawn image is cropped right after)."""
        if self._sizes[i, 0] < 0:
            self.image(i)
        h, w = self._sizes[i]
        return int(h), int(w)

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
            yield chosen, [draw_crop(self.size(i), crop_size, resize_long, True, rng) for i in chosen]

    def batches(self, keys: Sequence[int], size: int, crop_size: int, resize_long: tuple[int, int],
                rng: random.Random) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless ``(images [size, 3, crop, crop], labels [size, C])`` batches for one target,
        augmented on the host one image at a time (IRN's PIL path)."""
        for chosen, crops in self.draws(keys, size, crop_size, resize_long, rng):
            if not chosen:
                yield torch.zeros(0, 3, crop_size, crop_size), torch.zeros(0, len(self.classes))
                continue
            imgs = torch.stack([apply_crop(self.image(i), d) for i, d in zip(chosen, crops, strict=True)])
            yield imgs, torch.from_numpy(self.labels[chosen].astype(np.float32))

    def ahead(self, steps: Iterator[T], count: int) -> Iterator[T]:
        """The first ``count`` items of ``steps``, each made one item ahead on a background thread,
        so that reading, decoding and cropping the next step's companions overlaps the current RIB
        step (inline when ``prefetch`` is off). The first item starts at once; nothing is made past
        ``count``. The items and their order are those of ``steps``: only that thread advances it."""
        steps = islice(steps, count)
        if not self.prefetch:
            return steps
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="companions")
        return _drained(executor, executor.submit(next, steps), steps)


def _drained(executor: ThreadPoolExecutor, pending: Future, steps: Iterator[T]) -> Iterator[T]:
    try:
        while True:
            try:
                item = pending.result()
            except StopIteration:
                return
            pending = executor.submit(next, steps)
            yield item
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


class PoolRegistry:
    """The companion pools of this process, one per data set (the manifest's
    :attr:`~rib_core.data.datasets.Manifest.digest` and the cache settings): built once, shared by every chunk
    and job that uses that data set. ``builds`` counts the pools made."""

    def __init__(self, kept: int = POOLS_KEPT) -> None:
        self.kept = kept
        self.builds = 0
        self._pools: OrderedDict[tuple, CompanionPool] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, manifest: Manifest, limit: int | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
            disk_cache: str | os.PathLike[str] | None = None) -> CompanionPool:
        """The pool of ``manifest`` (its first ``limit`` images), built on the first call."""
        if limit:
            manifest = Manifest(manifest.classes, manifest.records[:limit], manifest.base)
        key = (manifest.digest, cache_bytes, os.fspath(disk_cache) if disk_cache else None)
        with self._lock:
            if key not in self._pools:
                self._pools[key] = CompanionPool.from_manifest(manifest, cache_bytes=cache_bytes,
                                                               disk_cache=disk_cache)
                self.builds += 1
                while len(self._pools) > self.kept:
                    self._pools.popitem(last=False)
            self._pools.move_to_end(key)
            return self._pools[key]

    def clear(self) -> None:
        """Drop every pool (a test's clean start); ``builds`` keeps counting."""
        with self._lock:
            self._pools.clear()


POOLS = PoolRegistry()


class DeviceCompanions:
    """A :class:`CompanionPool`'s companions on the device, one step at a time, for batched crops.

    :meth:`host_batch` gathers a step's companions into one edge-padded uint8 batch on the host
    (pinned for CUDA; it runs on the prefetch thread); :meth:`crops` copies it to the device
    asynchronously and :func:`~rib_core.training.augment.crops_on_device` resizes, flips and crops them all
    at once. Only one step's companions are ever on the device, whatever the pool's size.
    """

    def __init__(self, pool: CompanionPool, device: torch.device) -> None:
        self.pool = pool
        self.device = device

    def host_batch(self, chosen: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The companions of one step, ``chosen[target][k]``: ([n*k, H, W, 3] uint8 with every image
        padded to the largest by repeating its last row and column, [n*k, 2] sizes (h, w))."""
        images = [self.pool.image(i) for row in chosen for i in row]
        sizes = np.array([im.shape[:2] for im in images], dtype=np.int64).reshape(-1, 2)
        height, width = (int(v) for v in sizes.max(axis=0))
        batch = torch.from_numpy(np.stack([np.pad(im, ((0, height - im.shape[0]), (0, width - im.shape[1]), (0, 0)),
                                                  mode="edge") for im in images]))
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return batch, torch.from_numpy(sizes)

    def crops(self, chosen: list[list[int]], draws: list[list[CropDraw]],
              host: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's companions for n targets: ([n, k, 3, crop, crop] float, [n, k, C] labels);
        ``host`` is the step's :meth:`host_batch` when it was made ahead."""
        n, k = len(chosen), len(chosen[0])
        batch, sizes = host if host is not None else self.host_batch(chosen)
        x = crops_on_device(batch.to(self.device, non_blocking=True), sizes.to(self.device),
                            [d for row in draws for d in row])
        labels = torch.from_numpy(self.pool.labels[[i for row in chosen for i in row]].astype(np.float32))
        return x.unflatten(0, (n, k)), labels.to(self.device).unflatten(0, (n, k))
