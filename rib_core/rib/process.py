"""The RIB process (paper section 3.2) with the official ``obtain_RIB_CAM.py`` behaviour.

For one image x with classes c in t, start from the shared classifier theta_0 and take K SGD steps
on L_RIB = -sum_c y^c, the raw logits without a sigmoid, over a batch of x (scales 1.0, 1.5 and
2.0, each with its mirror) and companion crops whose classes are disjoint from x's. Pooling is GAP
or GNDRP, which leaves out pixels whose CAM already exceeds tau so that the non-discriminative
regions gain. The map M sums the CAMs (over scales 1.0, 0.5, 1.5, 2.0 and flips) of the
iterates, then is normalised per class and stored like a CAM.

Stopping follows the code: after the step on which the target's summed logits exceed the margin m,
or before a step whose CAM covers more than 70% of the image ("explosion").

The objective lives in :mod:`rib_core.rib.objective`, the two executors in
:mod:`rib_core.rib.engines`; :func:`fine_tune` is the loop both run.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from rib_core.classifier.cam import LocalizationMap, assemble_map, flip_fused
from rib_core.config.rib_config import RibConfig, RibPlan
from rib_core.rib.companions import CompanionPool, DeviceCompanions
from rib_core.rib.engines import BatchedEngine, Engine, PlainEngine, TrainablePart, VmappedHead
from rib_core.rib.objective import (
    STOP_REASONS,
    IterateSum,
    exploded,
    first_step_lr,
    margin_clamped,
    margin_reached,
    pool_images,
    rib_loss,
    takes_last_iterate,
    target_logit_sum,
)
from rib_core.training.augment import multiscale_flip_batches
from rib_core.training.networks import CamNet

CompanionSteps = Iterator[tuple[torch.Tensor, torch.Tensor] | None]


@dataclass
class RibOutcome:
    map: LocalizationMap
    steps: int                       # updates taken
    stop_reason: str                 # "iterations", "margin" or "explosion"
    target_logit_sums: list[float] = field(default_factory=list)  # per step, for the margin rule
    seconds: float = 0.0             # the image's share of the run's time
    images_in_step: int = 1          # images fine-tuned together (RibRunner.run_many)
    lr: float = 0.0                  # the step size used: RibConfig.lr, or the image's own (lr_rule)

    def stats(self) -> dict[str, object]:
        return {"steps": self.steps, "stop_reason": self.stop_reason, "target_logit_sums": self.target_logit_sums,
                "seconds": round(self.seconds, 3), "images_in_step": self.images_in_step, "lr": self.lr}


class Stops:
    """For n images fine-tuned together: who still trains, why the others stopped (an index into
    ``STOP_REASONS``), their updates and per-step target logit sums, all on the device."""

    def __init__(self, n: int, iterations: int, lr: float, device: torch.device) -> None:
        self.active = torch.ones(n, dtype=torch.bool, device=device)
        self.reason = torch.zeros(n, dtype=torch.long, device=device)
        self.steps = torch.zeros(n, dtype=torch.long, device=device)
        self.logit_sums = torch.zeros(iterations, n, device=device)
        self.lr = torch.full((n,), lr, device=device)
        self.frozen: list[int] = []

    def stop(self, hit: torch.Tensor, reason: str) -> None:
        hit = self.active & hit
        self.reason = torch.where(hit, STOP_REASONS.index(reason), self.reason)
        self.active = self.active & ~hit

    def any_running(self) -> bool:
        """One small copy per step: who still trains (the others' weights are kept as they are)."""
        running = self.active.tolist()
        self.frozen = [j for j, on in enumerate(running) if not on]
        return any(running)

    def updated(self, step: int, target_sum: torch.Tensor) -> None:
        self.logit_sums[step] = target_sum
        self.steps += self.active


def fine_tune(engine: Engine, lows: list[torch.Tensor], targets: torch.Tensor, loss_scales: list[int],
              companions: CompanionSteps, cfg: RibConfig) -> tuple[IterateSum, Stops]:
    """RIB for n images: ``lows`` [n, 2, c, h, w] per map scale, ``targets`` [n, C] multi-hot.

    Each step adds every map scale's CAM to M, checks the explosion rule on scale 1.0 (after it was
    added to M, before the other scales, as the official loop does), takes the step on L_RIB over
    the loss scales and the companions, and applies the margin rule. With ``lr_rule="first_step"``
    each image's step size is set before its first update (:func:`first_step_lr`) and applied as a
    scale of its loss, so both engines and every image of a batch keep one optimiser.
    """
    n, target_rows = len(targets), 2 * len(loss_scales)
    m, stops = IterateSum(len(lows)), Stops(n, cfg.iterations, cfg.lr, targets.device)
    for step in range(cfg.iterations):
        rows = []
        for i, low in enumerate(lows):
            raw = engine.cams(low)  # [n, 2, C, h, w]
            fused = flip_fused(raw.detach()) * stops.active[:, None, None, None]
            m.add(i, fused)
            if step > 0 and i == 0:
                stops.stop(exploded(fused, targets.bool(), cfg), "explosion")
            if i in loss_scales:
                rows.append(pool_images(raw, targets[:, None].expand(-1, 2, -1), cfg))
        if not stops.any_running():
            break
        labels = [targets[:, None].expand(-1, target_rows, -1)]
        batch = next(companions)
        if batch is not None:
            rows.append(pool_images(engine.cams(engine.low(batch[0])), batch[1], cfg))
            labels.append(batch[1])
        logits, labels_t = margin_clamped(torch.cat(rows, dim=1), cfg), torch.cat(labels, dim=1)
        losses = rib_loss(logits, labels_t) * stops.active
        if cfg.lr_rule == "first_step":
            if step == 0:
                stops.lr = first_step_lr(logits, labels_t, engine.weighted_grad_sq(losses.sum()), cfg.step_gain)
            losses = losses * (stops.lr / cfg.lr)
        engine.update(losses.sum(), stops.frozen)
        target_sum = target_logit_sum(logits, labels_t, target_rows)
        stops.updated(step, target_sum)
        stops.stop(margin_reached(target_sum, cfg), "margin")
    last = takes_last_iterate(cfg, stops.reason)
    if last is not None and bool(last.any()):
        with torch.no_grad():
            for i, low in enumerate(lows):
                m.add(i, flip_fused(engine.cams(low)) * last[:, None, None, None])
    return m, stops


class RibRunner:
    """Runs RIB against one shared classifier: image by image (:meth:`run`, the plain engine) or
    several images in one batched step (:meth:`run_many`, the batched engine, the fast path).

    The shared model is read only: each run starts from a fresh copy of its weights, so no
    image's fine-tuning leaks into another's. Stages 1-2 never change during RIB, so both engines
    compute their features without autograd, and the target's only once.
    """

    def __init__(self, model: CamNet, pool: CompanionPool, cfg: RibConfig | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":  # each image repeats its input shapes K times: let cuDNN pick kernels
            torch.backends.cudnn.benchmark = True
        self.shared = model
        self.shared_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.work = copy.deepcopy(model).to(self.device)
        self.work.set_bn_frozen(True)
        self.head = TrainablePart(self.work)
        self.vmapped = VmappedHead(self.head)
        self.pool = pool
        self.cfg = cfg or RibConfig()

    @cached_property
    def device_pool(self) -> DeviceCompanions:
        """Each step's companions uploaded to the device, for the batched engine's crops."""
        return DeviceCompanions(self.pool, self.device)

    def run(self, image: np.ndarray, keys: Sequence[int], cfg: RibConfig | None = None,
            seed: int | None = None, plan: RibPlan | None = None) -> RibOutcome:
        """RIB for one uint8 RGB image with its class indices ``keys`` (the plain engine). ``plan``:
        ``cfg.plan`` on this device as the caller resolved it (resolved here when not given)."""
        cfg = cfg or self.cfg
        if not len(keys):
            raise ValueError("RIB needs at least one class for the image")
        return self._run([image], [sorted(int(k) for k in keys)], cfg, [cfg.seed if seed is None else seed],
                         plan or cfg.plan(str(self.device)), batched=False, device_crops=False)[0]

    def run_many(self, images: Sequence[np.ndarray], keys_list: Sequence[Sequence[int]],
                 cfg: RibConfig | None = None, seeds: Sequence[int] | None = None,
                 device_crops: bool = True, plan: RibPlan | None = None) -> list[RibOutcome]:
        """RIB for several images of one size in one batched step each (the batched engine).

        An image that stops (margin or explosion) keeps its weights from then on while the others
        go on; M, the stops and the logit sums stay on the device until the end. The companion
        crops are made on the device in one call (:class:`DeviceCompanions`); ``device_crops=False``
        makes them on the host as :meth:`run` does, and then every image gets the map it gets from
        :meth:`run`, within float tolerance.
        """
        cfg = cfg or self.cfg
        n = len(images)
        if n == 0 or len(keys_list) != n or (seeds is not None and len(seeds) != n):
            raise ValueError("run_many needs one key list (and one seed) per image")
        if len({im.shape for im in images}) != 1:
            raise ValueError("run_many needs images of one size: group them by size")
        keys_list = [sorted(int(k) for k in keys) for keys in keys_list]
        if not all(keys_list):
            raise ValueError("RIB needs at least one class for every image")
        seeds = list(seeds) if seeds is not None else [cfg.seed] * n
        return self._run(images, keys_list, cfg, seeds, plan or cfg.plan(str(self.device)), batched=True,
                         device_crops=device_crops)

    def _run(self, images: Sequence[np.ndarray], keys_list: list[list[int]], cfg: RibConfig, seeds: list[int],
             plan: RibPlan, batched: bool, device_crops: bool) -> list[RibOutcome]:
        started = time.perf_counter()
        companions = self._companion_steps(keys_list, cfg, seeds, device_crops)  # starts reading them now
        engine = self._engine(cfg, plan, len(images) if batched else 0)
        scales = list(cfg.map_scales)
        lows = [engine.low(torch.stack(per_image)) for per_image in
                zip(*(multiscale_flip_batches(im, tuple(scales)) for im in images), strict=True)]
        targets = torch.zeros(len(images), len(self.pool.classes), device=self.device)
        for j, keys in enumerate(keys_list):
            targets[j, keys] = 1.0
        m, stops = fine_tune(engine, lows, targets, [scales.index(s) for s in cfg.loss_scales], companions, cfg)
        elapsed = (time.perf_counter() - started) / len(images)
        steps, reasons, sums = stops.steps.tolist(), stops.reason.tolist(), stops.logit_sums.T.tolist()
        lrs = stops.lr.tolist()
        return [RibOutcome(assemble_map(m.image(j), images[j].shape[:2], keys_list[j]), steps[j],
                           STOP_REASONS[reasons[j]], sums[j][: steps[j]], elapsed, len(images), lrs[j])
                for j in range(len(images))]

    def _engine(self, cfg: RibConfig, plan: RibPlan, batch: int) -> Engine:
        """The engine of this run, from the shared weights: batched for ``batch`` images, plain when 0."""
        if not batch:
            return PlainEngine(self.work, self.shared_state, self.head, cfg, plan, self.device)
        return BatchedEngine(self.work, self.shared_state, self.head, self.vmapped.function(cfg.compile), cfg, plan,
                             self.device, batch)

    def _companion_steps(self, keys_list: list[list[int]], cfg: RibConfig, seeds: Sequence[int],
                         on_device: bool) -> CompanionSteps:
        """Each step's companions of every image, ([n, k, 3, crop, crop], [n, k, C]) on the device,
        or None when there are none. Each image draws from its own ``random.Random(seed)`` in the
        same order on both engines; on the host they are cropped by PIL as IRN does. The next step's
        companions are made on a background thread (:meth:`CompanionPool.ahead`), for at most
        ``cfg.iterations`` steps."""
        per_image = [(keys, cfg.companions, cfg.crop_size, cfg.resize_long, random.Random(seed))
                     for keys, seed in zip(keys_list, seeds, strict=True)]
        if on_device:
            device_pool = self.device_pool

            def host_steps() -> Iterator[tuple | None]:  # draws, reads and padding: on the prefetch thread
                for step in zip(*(self.pool.draws(*args) for args in per_image), strict=True):
                    chosen, crops = [c for c, _ in step], [d for _, d in step]
                    yield (chosen, crops, device_pool.host_batch(chosen)) if _any_companions(chosen) else None

            return (None if item is None else device_pool.crops(*item)
                    for item in self.pool.ahead(host_steps(), cfg.iterations))

        def host_batches() -> Iterator[tuple | None]:  # draws, reads and PIL crops: on the prefetch thread
            for step in zip(*(self.pool.batches(*args) for args in per_image), strict=True):
                has = _any_companions([x for x, _ in step])
                yield (torch.stack([x for x, _ in step]), torch.stack([y for _, y in step])) if has else None

        return (None if item is None else (item[0].to(self.device), item[1].to(self.device))
                for item in self.pool.ahead(host_batches(), cfg.iterations))


def _any_companions(per_image: Sequence[Sized]) -> bool:
    if len({len(c) for c in per_image}) > 1:
        raise ValueError("some images have no companion with disjoint classes: run them one by one")
    return bool(len(per_image[0]))
