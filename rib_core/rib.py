"""The RIB process (paper section 3.2) with the official ``obtain_RIB_CAM.py`` behaviour.

For one image x with classes c in t, start from the shared classifier theta_0 and take K SGD steps
on L_RIB = -sum_c y^c, the raw logits without a sigmoid, over a batch of x (scales 1.0, 1.5 and
2.0, each with its mirror) and companion crops whose classes are disjoint from x's. Pooling is GAP
or GNDRP, which leaves out pixels whose CAM already exceeds tau so that the non-discriminative
regions gain. The map M sums the CAMs (over scales 1.0, 0.5, 1.5, 2.0 and flips) of the
iterates, then is normalised per class and stored like a CAM.

Stopping follows the code: after the step on which the target's summed logits exceed the margin m,
or before a step whose CAM covers more than 70% of the image ("explosion").
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from rib_core.augment import multiscale_flip_batches
from rib_core.cam import LocalizationMap, assemble_map, flip_fused, normalise_per_class
from rib_core.companions import CompanionPool, DeviceCompanions
from rib_core.networks import CamNet
from rib_core.optim import PolySGD, irn_param_groups
from rib_core.rib_config import RibConfig


def gap(raw: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, C] global average pooling."""
    return raw.mean(dim=(2, 3))


def gndrp(raw: torch.Tensor, labels: torch.Tensor, tau: float, denominator: str = "all",
          classes: int | None = None) -> torch.Tensor:
    """Global non-discriminative region pooling (paper Eq. 3), for a whole batch at once.

    For each labelled class, pixels whose CAM, divided by its (detached) maximum, is at or above
    ``tau`` are left out; unlabelled classes keep every pixel (their pooling is GAP). The official
    ``gndp2d`` zeroes the left-out pixels and still divides by all pixels (``"all"``); Eq. 3 divides
    by the kept pixels (``"kept"``). ``classes`` = n: only channels below n can leave pixels out,
    the rest pool by GAP (the official COCO run, whose ``gndp2d`` loops over VOC's 20 channels).
    """
    detached = raw.detach()
    norm = detached / detached.amax(dim=(2, 3), keepdim=True)
    labelled = labels.bool()
    if classes is not None:
        labelled = labelled & (torch.arange(labels.shape[1], device=labels.device) < classes)
    keep = torch.where(labelled[:, :, None, None], norm < tau, torch.ones_like(norm, dtype=torch.bool))
    kept = raw * keep
    if denominator == "all":
        return kept.mean(dim=(2, 3))
    return kept.sum(dim=(2, 3)) / keep.sum(dim=(2, 3)).clamp_min(1)


def pool(raw: torch.Tensor, labels: torch.Tensor, cfg: RibConfig) -> torch.Tensor:
    if cfg.pooling == "gap":
        return gap(raw)
    return gndrp(raw, labels, cfg.tau, cfg.gndrp_denominator, cfg.gndrp_classes)


def exploded(fused: torch.Tensor, key_mask: torch.Tensor, cfg: RibConfig) -> torch.Tensor:
    """[N, C, h, w] maps, [N, C] bool target classes -> [N] bool: the target's classes together
    cover more than ``explode_ratio`` of the map."""
    norm = normalise_per_class(fused)
    covered = ((norm > cfg.explode_threshold) & key_mask[:, :, None, None]).any(dim=1)
    return covered.float().mean(dim=(1, 2)) > cfg.explode_ratio


@dataclass
class RibOutcome:
    map: LocalizationMap
    steps: int                       # updates taken
    stop_reason: str                 # "iterations", "margin" or "explosion"
    target_logit_sums: list[float] = field(default_factory=list)  # per step, for the margin rule
    seconds: float = 0.0             # the image's share of the run's time
    images_in_step: int = 1          # images fine-tuned together (RibRunner.run_many)

    def stats(self) -> dict[str, object]:
        return {"steps": self.steps, "stop_reason": self.stop_reason, "target_logit_sums": self.target_logit_sums,
                "seconds": round(self.seconds, 3), "images_in_step": self.images_in_step}


STOP_REASONS = ("iterations", "margin", "explosion")
COMPILED_SHAPES = 64  # input shapes the compiled batched head is compiled for (RibRunner._head_function)


class RibRunner:
    """Runs RIB against one shared classifier: image by image (:meth:`run`, the official loop's
    structure) or several images in one batched step (:meth:`run_many`, the fast path).

    The shared model is read only: each image starts from a fresh copy of its weights, so no
    image's fine-tuning leaks into another's. Stages 1-2 never change during RIB (their output is
    detached and their BN statistics are frozen), so both paths compute their features without
    autograd, and the target's only once.
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
        self.head = _TrainablePart(self.work)
        self.pool = pool
        self.cfg = cfg or RibConfig()
        self._batched_head = torch.func.vmap(
            lambda params, fixed, low: torch.func.functional_call(self.head, (params, fixed), (low,)),
            in_dims=(0, None, 0))
        self._compiled_head: Callable[..., torch.Tensor] | None = None

    @cached_property
    def device_pool(self) -> DeviceCompanions:
        """The companion pool in device memory, made on the batched path's first use. On CUDA it
        takes at most a quarter of the free memory; a larger pool stays in pinned host memory."""
        budget = torch.cuda.mem_get_info(self.device)[0] // 4 if self.device.type == "cuda" else None
        return DeviceCompanions(self.pool, self.device, budget)

    def _start(self, cfg: RibConfig) -> tuple[torch.autocast, torch.memory_format]:
        """Reset the working model to the shared weights; the precision and layout of this run."""
        self.work.load_state_dict(self.shared_state)
        self.work.train()
        fast = cfg.uses_bf16(str(self.device))
        layout = torch.channels_last if fast else torch.contiguous_format
        self.work.to(memory_format=layout)
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=fast), layout

    def _low(self, x: torch.Tensor, autocast: torch.autocast, layout: torch.memory_format) -> torch.Tensor:
        with torch.no_grad(), autocast:
            return self.work.low_features(x.to(self.device).contiguous(memory_format=layout))

    def _optimizer(self, cfg: RibConfig, backbone: list[torch.Tensor], head: list[torch.Tensor]) -> PolySGD:
        return PolySGD(irn_param_groups(backbone, head, cfg.lr, cfg.weight_decay),
                       max_step=cfg.iterations, power=cfg.poly_power, momentum=cfg.momentum)

    def run(self, image: np.ndarray, keys: Sequence[int], cfg: RibConfig | None = None,
            seed: int | None = None) -> RibOutcome:
        """RIB for one uint8 RGB image with its class indices ``keys``."""
        cfg = cfg or self.cfg
        if not len(keys):
            raise ValueError("RIB needs at least one class for the image")
        started = time.perf_counter()
        keys = sorted(int(k) for k in keys)
        autocast, layout = self._start(cfg)
        optimizer = self._optimizer(cfg, *self.work.param_groups())
        rng = random.Random(cfg.seed if seed is None else seed)
        companions = self.pool.batches(keys, cfg.companions, cfg.crop_size, cfg.resize_long, rng)
        scales = list(cfg.map_scales)
        lows = [self._low(b, autocast, layout) for b in multiscale_flip_batches(image, tuple(scales))]
        loss_rows = [scales.index(s) for s in cfg.loss_scales]
        target = torch.zeros(len(self.pool.classes), device=self.device)
        target[keys] = 1.0
        sums: list[torch.Tensor] = [torch.zeros(0)] * len(scales)
        target_sums: list[float] = []
        stop_reason, steps = "iterations", 0
        for step in range(cfg.iterations):
            pooled, labels = [], []
            exploding = False
            for i, low in enumerate(lows):
                with autocast:
                    raw = self.head(low).float()
                fused = flip_fused(raw.detach())
                sums[i] = fused if step == 0 else sums[i] + fused
                # The official check runs after scale 1.0 was added to M, before the other scales.
                if step > 0 and i == 0 and exploded(fused[None], target[None].bool(), cfg).item():
                    exploding = True
                    break
                if i in loss_rows:
                    rows = target.expand(2, -1)
                    pooled.append(pool(raw, rows, cfg))
                    labels.append(rows)
            if exploding:
                stop_reason = "explosion"
                break
            comp_x, comp_y = next(companions)
            if len(comp_x):
                with autocast:
                    comp_raw = self.head(self._low(comp_x, autocast, layout)).float()
                comp_y = comp_y.to(self.device)
                pooled.append(pool(comp_raw, comp_y, cfg))
                labels.append(comp_y)
            logits, labels_t = torch.cat(pooled), torch.cat(labels)
            if cfg.margin_mode == "clamp":
                logits = logits.clamp(max=cfg.margin)
            loss = -(logits * labels_t).sum()
            target_sum = (logits[: 2 * len(loss_rows)] * labels_t[: 2 * len(loss_rows)]).sum().item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            target_sums.append(target_sum)
            if cfg.margin_mode == "stop" and abs(target_sum) > cfg.margin:
                stop_reason = "margin"
                break
        if cfg.map_iterates == "all_iterates" and stop_reason != "explosion":
            with torch.no_grad(), autocast:
                for i, low in enumerate(lows):
                    sums[i] = sums[i] + flip_fused(self.head(low).float())
        lmap = assemble_map(sums, image.shape[:2], keys)
        return RibOutcome(lmap, steps, stop_reason, target_sums, time.perf_counter() - started)

    def run_many(self, images: Sequence[np.ndarray], keys_list: Sequence[Sequence[int]],
                 cfg: RibConfig | None = None, seeds: Sequence[int] | None = None,
                 device_crops: bool = True) -> list[RibOutcome]:
        """RIB for several images of one size in one batched step each.

        Stages 3-4 and the classifier get one copy of their weights per image, stacked, and run
        through ``torch.func.vmap``: the sum of the images' losses gives each copy its own image's
        gradient, and the optimiser's update is elementwise, so every image's fine-tuning stays
        independent. An image that stops (margin or explosion) keeps its weights from then on
        while the others go on; M, the stops and the logit sums stay on the device until the end.
        The companion crops are made on the device in one call (:class:`DeviceCompanions`);
        ``device_crops=False`` makes them on the host as :meth:`run` does, and then every image
        gets the map it gets from :meth:`run`, within float tolerance.
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
        started = time.perf_counter()
        autocast, layout = self._start(cfg)
        stacked = {name: p.detach().unsqueeze(0).repeat(n, *[1] * p.dim()).requires_grad_()
                   for name, p in self.head.named_parameters() if p.requires_grad}
        optimizer = self._optimizer(cfg, [p for k, p in stacked.items() if not k.startswith("classifier.")],
                                    [p for k, p in stacked.items() if k.startswith("classifier.")])
        head = self._head_function(cfg)
        # Autocast does not reach inside vmap, so the bf16 path casts explicitly: bf16 copies of the
        # weights and features for the convolutions, float32 master weights for the updates.
        dtype = torch.bfloat16 if cfg.uses_bf16(str(self.device)) else torch.float32
        fixed = {k: v.to(dtype) if v.is_floating_point() else v
                 for k, v in [*self.head.named_parameters(), *self.head.named_buffers()] if k not in stacked}

        def cams(low: torch.Tensor) -> torch.Tensor:
            """[n, B, c, h, w] stage-2 features -> [n, B, C, h', w'] raw CAMs, each image its own weights.
            Each call casts the weights anew, so their gradients are summed in float32."""
            return head({k: p.to(dtype) for k, p in stacked.items()}, fixed, low.to(dtype)).float()

        def low_features(x: torch.Tensor) -> torch.Tensor:
            return self._low(x.flatten(0, 1), autocast, layout).unflatten(0, x.shape[:2])

        scales = list(cfg.map_scales)
        lows = [low_features(torch.stack(per_image)) for per_image in
                zip(*(multiscale_flip_batches(im, tuple(scales)) for im in images), strict=True)]
        loss_rows = [scales.index(s) for s in cfg.loss_scales]
        n_target = 2 * len(loss_rows)
        targets = torch.zeros(n, len(self.pool.classes), device=self.device)
        for j, keys in enumerate(keys_list):
            targets[j, keys] = 1.0
        key_mask = targets.bool()
        companion_steps = self._companion_steps(keys_list, cfg, seeds, device_crops)
        sums: list[torch.Tensor] = [torch.zeros(0)] * len(lows)
        active = torch.ones(n, dtype=torch.bool, device=self.device)
        reason = torch.zeros(n, dtype=torch.long, device=self.device)  # index into STOP_REASONS
        steps = torch.zeros(n, dtype=torch.long, device=self.device)
        logit_sums = torch.zeros(cfg.iterations, n, device=self.device)
        for step in range(cfg.iterations):
            rows: list[torch.Tensor] = []
            for i, low in enumerate(lows):
                raw = cams(low)  # [n, 2, C, h, w]
                fused = flip_fused(raw.detach()) * active[:, None, None, None]
                sums[i] = fused if step == 0 else sums[i] + fused
                # The official check runs after scale 1.0 was added to M, before the other scales.
                if step > 0 and i == 0:
                    boom = active & exploded(fused, key_mask, cfg)
                    reason = torch.where(boom, STOP_REASONS.index("explosion"), reason)
                    active = active & ~boom
                if i in loss_rows:
                    rows.append(pool(raw.flatten(0, 1), targets.repeat_interleave(2, 0), cfg).unflatten(0, (n, 2)))
            running = active.tolist()  # one small copy per step: who still trains
            if not any(running):
                break
            labels = [targets[:, None].expand(-1, n_target, -1)]
            companions = next(companion_steps)
            if companions is not None:
                comp_x, comp_y = companions
                rows.append(pool(cams(low_features(comp_x)).flatten(0, 1), comp_y.flatten(0, 1), cfg)
                            .unflatten(0, comp_y.shape[:2]))
                labels.append(comp_y)
            logits, labels_t = torch.cat(rows, dim=1), torch.cat(labels, dim=1)
            if cfg.margin_mode == "clamp":
                logits = logits.clamp(max=cfg.margin)
            loss = -(logits * labels_t * active[:, None, None]).sum()
            frozen = [j for j, on in enumerate(running) if not on]
            kept = {k: p.detach()[frozen].clone() for k, p in stacked.items()} if frozen else {}
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for k, value in kept.items():
                    stacked[k][frozen] = value
            per_image = (logits[:, :n_target] * labels_t[:, :n_target]).detach().sum(dim=(1, 2))
            logit_sums[step] = per_image
            steps += active
            if cfg.margin_mode == "stop":
                hit = active & (per_image.abs() > cfg.margin)
                reason = torch.where(hit, STOP_REASONS.index("margin"), reason)
                active = active & ~hit
        if cfg.map_iterates == "all_iterates":
            kept_maps = (reason != STOP_REASONS.index("explosion"))[:, None, None, None]
            with torch.no_grad():
                for i, low in enumerate(lows):
                    sums[i] = sums[i] + flip_fused(cams(low)) * kept_maps
        elapsed = (time.perf_counter() - started) / n
        steps_h, reasons_h, sums_h = steps.tolist(), reason.tolist(), logit_sums.T.tolist()
        return [RibOutcome(assemble_map([s[j] for s in sums], images[j].shape[:2], keys_list[j]), steps_h[j],
                           STOP_REASONS[reasons_h[j]], sums_h[j][: steps_h[j]], elapsed, n) for j in range(n)]

    def _head_function(self, cfg: RibConfig) -> Callable[..., torch.Tensor]:
        """The vmapped stage 3-4 + classifier call, compiled when ``cfg.compile``.

        Dynamo specialises the vmapped call on its input shapes even with ``dynamic=True``, so it
        compiles once per shape: each target size x scale and the companion crop, for each number of
        images in a batch. Past ``COMPILED_SHAPES`` of them new shapes run eagerly. Worth it for
        datasets of few image sizes; hence off by default.
        """
        if not cfg.compile:
            return self._batched_head
        if self._compiled_head is None:
            compiled = torch.compile(self._batched_head, dynamic=False)

            def head(*args: object) -> torch.Tensor:
                with torch._dynamo.config.patch(recompile_limit=COMPILED_SHAPES):
                    return compiled(*args)

            self._compiled_head = head
        return self._compiled_head

    def _companion_steps(self, keys_list: list[list[int]], cfg: RibConfig, seeds: Sequence[int] | None,
                         on_device: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor] | None]:
        """Each step's companions of every image, ([n, k, 3, crop, crop], [n, k, C]) on the device,
        or None when there are none. Each image draws from its own ``random.Random(seed)`` in the
        order :meth:`run` draws."""
        rngs = [random.Random(cfg.seed if seeds is None else seeds[j]) for j in range(len(keys_list))]
        per_image = [(keys, cfg.companions, cfg.crop_size, cfg.resize_long, rng)
                     for keys, rng in zip(keys_list, rngs, strict=True)]
        if on_device:
            for step in zip(*(self.pool.draws(*args) for args in per_image), strict=True):
                chosen, crops = [c for c, _ in step], [d for _, d in step]
                yield self.device_pool.crops(chosen, crops) if _any_companions(chosen) else None
        else:
            for step in zip(*(self.pool.batches(*args) for args in per_image), strict=True):
                if _any_companions([x for x, _ in step]):
                    yield (torch.stack([x for x, _ in step]).to(self.device),
                           torch.stack([y for _, y in step]).to(self.device))
                else:
                    yield None


def _any_companions(per_image: Sequence[Sized]) -> bool:
    if len({len(c) for c in per_image}) > 1:
        raise ValueError("some images have no companion with disjoint classes: run them one by one")
    return bool(len(per_image[0]))


class _TrainablePart(torch.nn.Module):
    """Stages 3-4 and the classifier of a :class:`CamNet` as one module (what RIB fine-tunes)."""

    def __init__(self, model: CamNet) -> None:
        super().__init__()
        self.layer3, self.layer4, self.classifier = model.backbone.layer3, model.backbone.layer4, model.classifier

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layer4(self.layer3(low)))
