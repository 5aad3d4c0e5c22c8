"""A plain reference of the official ``obtain_RIB_CAM.py`` loop, for the parity test.

It follows the official structure step by step — a model reloaded from the shared state dict,
IRN's ``PolyOptimizer`` (``SGD(params, lr, weight_decay)``: the third argument is momentum), a
``RIB_learn`` that loops over the scales and a ``gndp2d`` that loops over images and classes,
``outputs_cam`` accumulated on the CPU, the explosion check, the ``stop_th`` rule and
``save_npy`` — and shares nothing with ``rib_core.rib.process`` but the network and the companion
sampler (so that both see the same random batches).
"""

from __future__ import annotations

import copy
import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rib_core.config.rib_config import RibConfig
from rib_core.rib.companions import CompanionPool
from rib_core.training.augment import multiscale_flip_batches, strided_size, strided_up_size
from rib_core.training.networks import CamNet


class ReferencePolyOptimizer(torch.optim.SGD):
    def __init__(self, params, lr, weight_decay, max_step, momentum=0.9):
        super().__init__(params, lr, weight_decay)  # as IRN: weight_decay lands on SGD's momentum
        self.global_step = 0
        self.max_step = max_step
        self.momentum = momentum
        self.initial_lr = [group["lr"] for group in self.param_groups]

    def step(self, closure=None):
        if self.global_step < self.max_step:
            lr_mult = (1 - self.global_step / self.max_step) ** self.momentum
            for i in range(len(self.param_groups)):
                self.param_groups[i]["lr"] = self.initial_lr[i] * lr_mult
        super().step(closure)
        self.global_step += 1


def gap2d(x):
    return torch.mean(x.view(x.size(0), x.size(1), -1), -1)


def gndp2d(x, valid_cat, score_th, per_image):
    norm_x = torch.zeros_like(x)
    for b in range(x.shape[0]):
        cats = torch.nonzero(valid_cat[b])[:, 0].tolist() if per_image else valid_cat
        for c in range(x.shape[1]):
            if c in cats:
                norm_x[b, c] = (x[b, c] / x[b, c].max()).detach()
            else:
                norm_x[b, c, :] = -1
    return torch.mean((x * (norm_x < score_th)).view(x.size(0), x.size(1), -1), -1)


def reference_rib(shared: CamNet, pool: CompanionPool, image: np.ndarray, keys: list[int],
                  cfg: RibConfig, seed: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Returns ``{"cam": strided map, "high_res": full map}`` as ``save_npy`` computes them, with
    ``"steps"`` (updates taken) and ``"stop_reason"`` ("iterations", "margin" or "explosion")."""
    model = copy.deepcopy(shared).to(device)
    model.load_state_dict(shared.state_dict(), strict=True)
    model.set_bn_frozen(True)
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    optimizer = ReferencePolyOptimizer([
        {"params": backbone, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": list(model.classifier.parameters()), "lr": 10 * cfg.lr, "weight_decay": cfg.weight_decay},
    ], lr=cfg.lr, weight_decay=cfg.weight_decay, max_step=cfg.iterations)
    img = [x.to(device) for x in multiscale_flip_batches(image, (1.0, 0.5, 1.5, 2.0))]
    label = torch.zeros(1, len(pool.classes), device=device)
    label[0, keys] = 1
    loader = pool.batches(keys, cfg.companions, cfg.crop_size, cfg.resize_long, random.Random(seed))
    outputs_cam: list[torch.Tensor] = []
    steps, stop_reason = 0, "iterations"

    for rib_step in range(cfg.iterations):
        img_rib, label_rib = (t.to(device) for t in next(loader))
        # ---- RIB_learn ----
        logits_total, labels_total = [], []
        stop = False
        for img_idx, img_target in enumerate(img):
            cam = model.cam(img_target)
            cam_flip_one = F.relu(cam)
            cam_flip_one = cam_flip_one[0] + cam_flip_one[1].flip(-1)
            if rib_step == 0:
                outputs_cam.append(cam_flip_one.data.cpu())
            else:
                outputs_cam[img_idx] += cam_flip_one.data.cpu()
            if rib_step > 0 and img_idx == 0:
                cam_interest = cam_flip_one.data.cpu()[keys]
                cam_norm = (cam_interest / (F.adaptive_max_pool2d(cam_interest, (1, 1)) + 1e-5)) > cfg.explode_threshold
                cam_norm = torch.clip(cam_norm.sum(axis=0), 0, 1)
                if cam_norm.sum() / cam_norm.shape[0] / cam_norm.shape[1] > cfg.explode_ratio:
                    stop = True
                    break
            if img_idx != 1:
                if cfg.pooling == "gap":
                    logits_total.append(gap2d(cam))
                else:
                    logits_total.append(gndp2d(cam, keys, cfg.tau, per_image=False))
                labels_total.append(label)
                labels_total.append(label)
        if stop:
            stop_reason = "explosion"
            break
        if len(img_rib):
            cam_rib = model.cam(img_rib)
            if cfg.pooling == "gap":
                logits_total.append(gap2d(cam_rib))
            else:
                logits_total.append(gndp2d(cam_rib, label_rib, cfg.tau, per_image=True))
            labels_total.append(label_rib)
        logits_total = torch.cat(logits_total, dim=0)
        labels_total = torch.cat(labels_total, dim=0)
        target_class = logits_total * labels_total
        target_loss = target_class[:6].sum()
        loss = -target_class.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
        if torch.abs(target_loss) > cfg.margin:
            stop_reason = "margin"
            break

    # ---- save_npy ----
    size = image.shape[:2]
    s4, up = strided_size(size, 4), strided_up_size(size, 16)
    strided_cam = torch.sum(torch.stack(
        [F.interpolate(torch.unsqueeze(o, 0), s4, mode="bilinear", align_corners=False)[0] for o in outputs_cam]), 0)
    highres_cam = [F.interpolate(torch.unsqueeze(o, 1), up, mode="bilinear", align_corners=False) for o in outputs_cam]
    highres_cam = torch.sum(torch.stack(highres_cam, 0), 0)[:, 0, :size[0], :size[1]]
    strided_cam = strided_cam[keys]
    strided_cam /= F.adaptive_max_pool2d(strided_cam, (1, 1)) + 1e-5
    highres_cam = highres_cam[keys]
    highres_cam /= F.adaptive_max_pool2d(highres_cam, (1, 1)) + 1e-5
    return {"cam": strided_cam.numpy(), "high_res": highres_cam.numpy(), "steps": steps, "stop_reason": stop_reason}
