"""Many images through RIB: which engine runs them and how many share one batched step.

The batched engine (:meth:`RibRunner.run_many`) needs images of one size, so images are grouped
by size. How many go into one step is set by the free device memory: the first batch of a size
runs one image and measures its peak memory, later batches take as many as fit in 90% of what is
free. An out-of-memory batch is retried at half the size, so no image is lost to a bad estimate;
any other failure of a batch is retried image by image, so that one bad image fails alone.
:func:`run_rib` runs a whole manifest this way (the CLI's ``rib rib`` and the demo job).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from rib_core.config.rib_config import MAX_IMAGES_PER_BATCH, RibConfig, RibPlan, image_seed
from rib_core.data.datasets import Manifest, load_image
from rib_core.rib.companions import CompanionPool
from rib_core.rib.process import RibOutcome, RibRunner
from rib_core.runtime.progress import ImageProgress
from rib_core.training.networks import CamNet

FREE_MEMORY_SHARE = 0.9     # of the free device memory a batch may plan to use


class RibBatcher:
    """Runs lists of images through one :class:`RibRunner`, batched where the config says so."""

    def __init__(self, runner: RibRunner) -> None:
        self.runner = runner
        self.device = runner.device
        self.bytes_per_image: dict[tuple, int] = {}  # measured peak, by image size and config
        self.ceiling: dict[tuple, int] = {}          # halved after an out-of-memory batch

    def run_all(self, images: Sequence[np.ndarray], keys_list: Sequence[Sequence[int]], cfg: RibConfig,
                seeds: Sequence[int], plan: RibPlan | None = None) -> list[RibOutcome | Exception]:
        """RIB for every image with its seed (:func:`~rib_core.config.rib_config.image_seed`), in order;
        an image that fails gets its exception instead. ``plan``: ``cfg.plan`` on this device, as the
        caller resolved it for its task (resolved here when not given)."""
        plan = plan or cfg.plan(str(self.device))
        if not plan.batched:
            return [_guarded(lambda j=j: self.runner.run(images[j], keys_list[j], cfg, seeds[j], plan))
                    for j in range(len(images))]
        results: dict[int, RibOutcome | Exception] = {}
        by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for j, image in enumerate(images):
            by_size[image.shape].append(j)
        for shape, pending in by_size.items():
            key = _memory_key(shape, cfg)
            while pending:
                n = self.images_per_batch(shape, cfg, plan, len(pending))
                part, pending = pending[:n], pending[n:]
                try:
                    outcomes = self._measured_run(key, cfg, plan, [images[j] for j in part],
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
                    outcomes = [_guarded(lambda j=j: self.runner.run_many([images[j]], [keys_list[j]], cfg, [seeds[j]],
                                                                          plan=plan)[0]) for j in part]
                results.update(zip(part, outcomes, strict=True))
        return [results[j] for j in range(len(images))]

    def images_per_batch(self, shape: tuple[int, ...], cfg: RibConfig, plan: RibPlan, pending: int) -> int:
        """How many images of ``shape`` the next batched step takes: ``cfg.max_images_per_batch``
        when set, else what 90% of the free CUDA memory holds at the measured bytes per image (1
        until measured, and always 1 on the CPU); never more than an out-of-memory retry allows."""
        key = _memory_key(shape, cfg)
        n = plan.images_per_step
        if not n:
            per_image = self.bytes_per_image.get(key)
            if per_image is None:
                n = 1
            else:
                free, _ = torch.cuda.mem_get_info(self.device)
                free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
                n = int(free * FREE_MEMORY_SHARE // per_image)
        return max(1, min(n, pending, self.ceiling.get(key, MAX_IMAGES_PER_BATCH)))

    def _measured_run(self, key: tuple, cfg: RibConfig, plan: RibPlan, images: list[np.ndarray],
                      keys_list: list[Sequence[int]], seeds: list[int]) -> list[RibOutcome]:
        if self.device.type != "cuda":
            return self.runner.run_many(images, keys_list, cfg, seeds, plan=plan)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        outcomes = self.runner.run_many(images, keys_list, cfg, seeds, plan=plan)
        per_image = -(-(torch.cuda.max_memory_allocated(self.device) - base) // len(images))
        self.bytes_per_image[key] = max(self.bytes_per_image.get(key, 1), per_image)
        return outcomes


def run_rib(model: CamNet, manifest: Manifest, pool: CompanionPool, out_dir: str | os.PathLike[str],
            cfg: RibConfig | None = None, device: torch.device | str = "cpu", progress: bool = True,
            ) -> Path:
    """RIB maps M for every image of ``manifest`` as ``out_dir/<id>.npz``; existing files are kept.

    Each image's sampling seed is :func:`~rib_core.config.rib_config.image_seed` of ``cfg.seed`` and its
    id, as on the service's path, so a rerun, a resumed run or another manifest gives the same
    maps. With the batched engine (by default on CUDA) up to ``MAX_IMAGES_PER_BATCH`` images are
    loaded at a time and share steps; otherwise one at a time.
    Every map that succeeds is written; then the first failure, if any, is raised.
    """
    cfg = cfg or RibConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    batcher = RibBatcher(RibRunner(model, pool, cfg, device))
    plan = cfg.plan(str(batcher.device))  # resolved once for the whole run
    block = plan.images_loaded
    todo = [r for r in manifest.records if not (out / f"{r.id}.npz").exists()]
    bar = ImageProgress(total=len(manifest.records), initial=len(manifest.records) - len(todo),
                        desc=f"rib-{cfg.pooling}", disable=not progress)
    failures: list[tuple[str, Exception]] = []
    for start in range(0, len(todo), block):
        part = todo[start:start + block]
        outcomes = batcher.run_all([load_image(manifest.image_uri(r)) for r in part],
                                   [manifest.label_indices(r) for r in part], cfg,
                                   [image_seed(cfg.seed, r.id) for r in part], plan)
        for r, outcome in zip(part, outcomes, strict=True):
            bar.update(1)
            if isinstance(outcome, Exception):
                failures.append((r.id, outcome))
                continue
            path = out / f"{r.id}.npz"
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(outcome.map.to_bytes())
            os.replace(tmp, path)
            bar.set_postfix(stop=outcome.stop_reason, steps=outcome.steps)
    bar.close()
    if failures:
        image_id, error = failures[0]
        raise RuntimeError(f"RIB failed on {len(failures)} image(s), first {image_id}: "
                           f"{type(error).__name__}: {error}") from error
    return out


def _memory_key(shape: tuple[int, ...], cfg: RibConfig) -> tuple:
    """What a batched step's memory per image depends on."""
    return shape, cfg.companions, cfg.crop_size, cfg.map_scales, cfg.loss_scales, cfg.precision, cfg.compile


def _guarded(fn: Callable[[], RibOutcome]) -> RibOutcome | Exception:
    try:
        return fn()
    except Exception as e:  # reported on the image, the batch goes on
        return e.with_traceback(None)  # the traceback would hold the failed step's tensors
