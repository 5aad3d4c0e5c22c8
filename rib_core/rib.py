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
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rib_core.augment import multiscale_flip_batches
from rib_core.cam import LocalizationMap, assemble_map, flip_fused, normalise_per_class
from rib_core.companions import CompanionPool
from rib_core.datasets import Manifest, load_image
from rib_core.networks import CamNet
from rib_core.optim import PolySGD, irn_param_groups
from rib_core.rib_config import RibConfig


def gap(raw: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, C] global average pooling."""
    return raw.mean(dim=(2, 3))


def gndrp(raw: torch.Tensor, labels: torch.Tensor, tau: float, denominator: str = "all") -> torch.Tensor:
    """Global non-discriminative region pooling (paper Eq. 3), for a whole batch at once.

    For each labelled class, pixels whose CAM, divided by its (detached) maximum, is at or above
    ``tau`` are left out; unlabelled classes keep every pixel (their pooling is GAP). The official
    ``gndp2d`` zeroes the left-out pixels and still divides by all pixels (``"all"``); Eq. 3 divides
    by the kept pixels (``"kept"``).
    """
    detached = raw.detach()
    norm = detached / detached.amax(dim=(2, 3), keepdim=True)
    labelled = labels.bool()[:, :, None, None]
    keep = torch.where(labelled, norm < tau, torch.ones_like(norm, dtype=torch.bool))
    kept = raw * keep
    if denominator == "all":
        return kept.mean(dim=(2, 3))
    return kept.sum(dim=(2, 3)) / keep.sum(dim=(2, 3)).clamp_min(1)


def pool(raw: torch.Tensor, labels: torch.Tensor, cfg: RibConfig) -> torch.Tensor:
    if cfg.pooling == "gap":
        return gap(raw)
    return gndrp(raw, labels, cfg.tau, cfg.gndrp_denominator)


def explosion(fused: torch.Tensor, keys: Sequence[int], cfg: RibConfig) -> bool:
    """True when the target's classes together cover more than ``explode_ratio`` of the map."""
    norm = normalise_per_class(fused[list(keys)])
    covered = (norm > cfg.explode_threshold).any(dim=0)
    return covered.float().mean().item() > cfg.explode_ratio


@dataclass
class RibOutcome:
    map: LocalizationMap
    steps: int                       # updates taken
    stop_reason: str                 # "iterations", "margin" or "explosion"
    target_logit_sums: list[float] = field(default_factory=list)  # per step, for the margin rule
    seconds: float = 0.0

    def stats(self) -> dict[str, object]:
        return {"steps": self.steps, "stop_reason": self.stop_reason,
                "target_logit_sums": self.target_logit_sums, "seconds": round(self.seconds, 3)}


class RibRunner:
    """Runs RIB image after image against one shared classifier.

    The shared model is read only: each image starts from a fresh copy of its weights in a working
    model, so no image's fine-tuning leaks into another's.
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
        self.pool = pool
        self.cfg = cfg or RibConfig()

    def _optimizer(self, cfg: RibConfig) -> PolySGD:
        backbone, head = self.work.param_groups()
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
        self.work.load_state_dict(self.shared_state)
        self.work.train()
        optimizer = self._optimizer(cfg)
        rng = random.Random(cfg.seed if seed is None else seed)
        companions = self.pool.batches(keys, cfg.companions, cfg.crop_size, cfg.resize_long, rng)
        scales = list(cfg.map_scales)
        fast = cfg.uses_bf16(str(self.device))
        layout = torch.channels_last if fast else torch.contiguous_format
        self.work.to(memory_format=layout)
        inputs = [b.to(self.device).contiguous(memory_format=layout)
                  for b in multiscale_flip_batches(image, tuple(scales))]
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=fast)
        loss_rows = [scales.index(s) for s in cfg.loss_scales]
        target = torch.zeros(len(self.pool.classes), device=self.device)
        target[keys] = 1.0
        sums: list[torch.Tensor] = [torch.zeros(0)] * len(scales)
        target_sums: list[float] = []
        stop_reason, steps = "iterations", 0
        for step in range(cfg.iterations):
            pooled, labels = [], []
            exploded = False
            for i, x in enumerate(inputs):
                with autocast:
                    raw = self.work.cam(x).float()
                fused = flip_fused(raw.detach())
                sums[i] = fused if step == 0 else sums[i] + fused
                # The official check runs after scale 1.0 was added to M, before the other scales.
                if step > 0 and i == 0 and explosion(fused, keys, cfg):
                    exploded = True
                    break
                if i in loss_rows:
                    rows = target.expand(2, -1)
                    pooled.append(pool(raw, rows, cfg))
                    labels.append(rows)
            if exploded:
                stop_reason = "explosion"
                break
            comp_x, comp_y = next(companions)
            if len(comp_x):
                comp_y = comp_y.to(self.device)
                with autocast:
                    comp_raw = self.work.cam(comp_x.to(self.device).contiguous(memory_format=layout)).float()
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
                for i, x in enumerate(inputs):
                    sums[i] = sums[i] + flip_fused(self.work.cam(x).float())
        lmap = assemble_map([s.cpu() for s in sums], image.shape[:2], keys)
        return RibOutcome(lmap, steps, stop_reason, target_sums, time.perf_counter() - started)


    def run_many(self, images: Sequence[np.ndarray], keys_list: Sequence[Sequence[int]],
                 cfg: RibConfig | None = None, seeds: Sequence[int] | None = None) -> list[RibOutcome]:
        """RIB for several images of one size in one batched step each: the same maps as :meth:`run`
        image by image, within float tolerance.

        Stages 1-2 never change (their output is detached), so their features are computed once
        for all images and scales, without autograd. Stages 3-4 and the classifier get one copy of
        their weights per image, stacked, and run through ``torch.func.vmap``: the sum of the
        images' losses gives each copy its own image's gradient, and the optimiser's update is
        elementwise, so every image's fine-tuning stays independent. An image that stops (margin or
        explosion) keeps its weights from then on while the others go on.
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
        self.work.load_state_dict(self.shared_state)
        self.work.train()
        head = _TrainablePart(self.work)
        stacked = {name: p.detach().unsqueeze(0).repeat(n, *[1] * p.dim()).requires_grad_()
                   for name, p in head.named_parameters() if p.requires_grad}
        classifier = {name for name in stacked if name.startswith("classifier.")}
        optimizer = PolySGD(irn_param_groups([p for k, p in stacked.items() if k not in classifier],
                                             [p for k, p in stacked.items() if k in classifier], cfg.lr,
                                             cfg.weight_decay),
                            max_step=cfg.iterations, power=cfg.poly_power, momentum=cfg.momentum)
        batched_head = torch.func.vmap(lambda params, low: torch.func.functional_call(head, params, (low,)))
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.uses_bf16(str(self.device)))

        def cams(low: torch.Tensor) -> torch.Tensor:
            """[N, B, c, h, w] stage-2 features -> [N, B, C, h', w'] raw CAMs, each image its own weights."""
            with autocast:
                return batched_head(stacked, low).float()

        def low_features(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), autocast:
                return self.work.low_features(x.flatten(0, 1).to(self.device)).unflatten(0, x.shape[:2])

        scales = list(cfg.map_scales)
        lows = [low_features(torch.stack(per_image)) for per_image in
                zip(*(multiscale_flip_batches(im, tuple(scales)) for im in images), strict=True)]
        loss_rows = [scales.index(s) for s in cfg.loss_scales]
        targets = torch.zeros(n, len(self.pool.classes), device=self.device)
        for j, keys in enumerate(keys_list):
            targets[j, keys] = 1.0
        companions = [self.pool.batches(keys, cfg.companions, cfg.crop_size, cfg.resize_long,
                                        random.Random(cfg.seed if seeds is None else seeds[j]))
                      for j, keys in enumerate(keys_list)]
        sums: list[torch.Tensor] = [torch.zeros(0)] * len(lows)
        active = [True] * n
        steps, reasons = [0] * n, ["iterations"] * n
        target_sums: list[list[float]] = [[] for _ in range(n)]
        for step in range(cfg.iterations):
            before = [j for j in range(n) if active[j]]
            rows: list[torch.Tensor] = []
            for i, low in enumerate(lows):
                raw = cams(low)  # [N, 2, C, h, w]
                fused = torch.stack([flip_fused(r) for r in raw.detach()])
                if step == 0:
                    sums[i] = torch.zeros_like(fused)
                for j in range(n):
                    if active[j]:
                        sums[i][j] += fused[j]
                # The official check runs after scale 1.0 was added to M, before the other scales.
                if step > 0 and i == 0:
                    for j in before:
                        if explosion(fused[j], keys_list[j], cfg):
                            active[j], reasons[j] = False, "explosion"
                if i in loss_rows:
                    rows.append(pool(raw.flatten(0, 1), targets.repeat_interleave(2, 0), cfg).unflatten(0, (n, 2)))
            if not any(active):
                break
            labels = [targets[:, None].expand(-1, 2 * len(loss_rows), -1)]
            comp = [next(g) for g in companions]  # a stopped image's draws are never used
            if len({len(x) for x, _ in comp}) > 1:
                raise ValueError("some images have no companion with disjoint classes: run them one by one")
            if len(comp[0][0]):
                comp_y = torch.stack([y for _, y in comp]).to(self.device)
                comp_raw = cams(low_features(torch.stack([x for x, _ in comp])))
                rows.append(pool(comp_raw.flatten(0, 1), comp_y.flatten(0, 1), cfg).unflatten(0, comp_y.shape[:2]))
                labels.append(comp_y)
            logits, labels_t = torch.cat(rows, dim=1), torch.cat(labels, dim=1)
            if cfg.margin_mode == "clamp":
                logits = logits.clamp(max=cfg.margin)
            mask = torch.tensor(active, device=self.device, dtype=logits.dtype)[:, None, None]
            loss = -(logits * labels_t * mask).sum()
            n_target = 2 * len(loss_rows)
            per_image = (logits[:, :n_target] * labels_t[:, :n_target]).sum(dim=(1, 2)).tolist()
            frozen = [j for j in range(n) if not active[j]]
            kept = {k: p.detach()[frozen].clone() for k, p in stacked.items()} if frozen else {}
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for k, value in kept.items():
                    stacked[k][frozen] = value
            for j in range(n):
                if active[j]:
                    steps[j] += 1
                    target_sums[j].append(per_image[j])
                    if cfg.margin_mode == "stop" and abs(per_image[j]) > cfg.margin:
                        active[j], reasons[j] = False, "margin"
            if not any(active):
                break
        if cfg.map_iterates == "all_iterates":
            with torch.no_grad():
                for i, low in enumerate(lows):
                    fused = torch.stack([flip_fused(r) for r in cams(low)])
                    for j in range(n):
                        if reasons[j] != "explosion":
                            sums[i][j] += fused[j]
        elapsed = (time.perf_counter() - started) / n
        return [RibOutcome(assemble_map([s[j].cpu() for s in sums], images[j].shape[:2], keys_list[j]), steps[j],
                           reasons[j], target_sums[j], elapsed) for j in range(n)]


class _TrainablePart(torch.nn.Module):
    """Stages 3-4 and the classifier of a :class:`CamNet` as one module (what RIB fine-tunes)."""

    def __init__(self, model: CamNet) -> None:
        super().__init__()
        self.layer3, self.layer4, self.classifier = model.backbone.layer3, model.backbone.layer4, model.classifier

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layer4(self.layer3(low)))


def run_rib(model: CamNet, manifest: Manifest, pool: CompanionPool, out_dir: str | os.PathLike[str],
            cfg: RibConfig | None = None, device: torch.device | str = "cpu", progress: bool = True,
            ) -> Path:
    """RIB maps M for every image of ``manifest`` as ``out_dir/<id>.npz``; existing files are kept.

    Each image's sampling seed is derived from ``cfg.seed`` and its position, so a rerun or a
    resumed run gives the same maps.
    """
    cfg = cfg or RibConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runner = RibRunner(model, pool, cfg, device)
    bar = tqdm(manifest.records, desc=f"rib-{cfg.pooling}", disable=not progress, unit="img")
    for n, r in enumerate(bar):
        path = out / f"{r.id}.npz"
        if path.exists():
            continue
        seed = cfg.seed * 1_000_003 + n
        outcome = runner.run(load_image(manifest.image_uri(r)), manifest.label_indices(r), seed=seed)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(outcome.map.to_bytes())
        os.replace(tmp, path)
        bar.set_postfix(stop=outcome.stop_reason, steps=outcome.steps)
    return out
