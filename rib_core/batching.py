"""Many images through RIB: which engine runs them and how many share one batched step.

The batched engine (:meth:`RibRunner.run_many`) needs images of one size, so images are grouped
by size. How many go into one step is set by the free device memory: the first batch of a size
runs one image and measures its peak memory, later batches take as many as fit in 90% of what is
free. An out-of-memory batch is retried at half the size, so no image is lost to a bad estimate;
any other failure of a batch is retried image by image, so that one bad image fails alone.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch

from rib_core.rib import RibOutcome, RibRunner
from rib_core.rib_config import RibConfig

MAX_IMAGES_PER_BATCH = 64   # RibConfig.max_images_per_batch's bound
FREE_MEMORY_SHARE = 0.9     # of the free device memory a batch may plan to use


class RibBatcher:
    """Runs lists of images through one :class:`RibRunner`, batched where the config says so."""

    def __init__(self, runner: RibRunner) -> None:
        self.runner = runner
        self.device = runner.device
        self.bytes_per_image: dict[tuple, int] = {}  # measured peak, by image size and config
        self.ceiling: dict[tuple, int] = {}          # halved after an out-of-memory batch

    def run_all(self, images: Sequence[np.ndarray], keys_list: Sequence[Sequence[int]], cfg: RibConfig,
                seeds: Sequence[int] | None = None) -> list[RibOutcome | Exception]:
        """RIB for every image, in order; an image that fails gets its exception instead."""
        seeds = list(seeds) if seeds is not None else [cfg.seed] * len(images)
        if not cfg.batched(str(self.device)):
            return [_guarded(lambda j=j: self.runner.run(images[j], keys_list[j], cfg, seeds[j]))
                    for j in range(len(images))]
        results: dict[int, RibOutcome | Exception] = {}
        by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for j, image in enumerate(images):
            by_size[image.shape].append(j)
        for shape, pending in by_size.items():
            key = _memory_key(shape, cfg)
            while pending:
                n = self.images_per_batch(shape, cfg, len(pending))
                part, pending = pending[:n], pending[n:]
                try:
                    outcomes = self._measured_run(key, cfg, [images[j] for j in part],
                                                  [keys_list[j] for j in part], [seeds[j] for j in part])
                except torch.OutOfMemoryError as e:
                    if n > 1:  # the estimate was wrong: retry these at half the size
                        self.ceiling[key] = n // 2
                        pending = part + pending
                    else:
                        results[part[0]] = e.with_traceback(None)
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                except Exception:  # isolate the image that fails, keep the others
                    outcomes = [_guarded(lambda j=j: self.runner.run_many([images[j]], [keys_list[j]], cfg,
                                                                          [seeds[j]])[0]) for j in part]
                results.update(zip(part, outcomes, strict=True))
        return [results[j] for j in range(len(images))]

    def images_per_batch(self, shape: tuple[int, ...], cfg: RibConfig, pending: int) -> int:
        """How many images of ``shape`` the next batched step takes: ``cfg.max_images_per_batch``
        when set, else what 90% of the free CUDA memory holds at the measured bytes per image (1
        until measured, and always 1 on the CPU); never more than an out-of-memory retry allows."""
        key = _memory_key(shape, cfg)
        n = cfg.max_images_per_batch
        if not n:
            per_image = self.bytes_per_image.get(key)
            if self.device.type != "cuda" or per_image is None:
                n = 1
            else:
                free, _ = torch.cuda.mem_get_info(self.device)
                free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
                n = int(free * FREE_MEMORY_SHARE // per_image)
        return max(1, min(n, pending, self.ceiling.get(key, MAX_IMAGES_PER_BATCH)))

    def _measured_run(self, key: tuple, cfg: RibConfig, images: list[np.ndarray],
                      keys_list: list[Sequence[int]], seeds: list[int]) -> list[RibOutcome]:
        if self.device.type != "cuda":
            return self.runner.run_many(images, keys_list, cfg, seeds)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        outcomes = self.runner.run_many(images, keys_list, cfg, seeds)
        per_image = -(-(torch.cuda.max_memory_allocated(self.device) - base) // len(images))
        self.bytes_per_image[key] = max(self.bytes_per_image.get(key, 1), per_image)
        return outcomes


def _memory_key(shape: tuple[int, ...], cfg: RibConfig) -> tuple:
    """What a batched step's memory per image depends on."""
    return shape, cfg.companions, cfg.crop_size, cfg.map_scales, cfg.loss_scales, cfg.precision, cfg.compile


def _guarded(fn: Callable[[], RibOutcome]) -> RibOutcome | Exception:
    try:
        return fn()
    except Exception as e:  # reported on the image, the batch goes on
        return e.with_traceback(None)  # the traceback would hold the failed step's tensors
