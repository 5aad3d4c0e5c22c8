"""RIB's objective and rules (paper section 3.2, official ``obtain_RIB_CAM.py``), once for both engines.

Every function takes a batch of images with a leading image dimension where it matters, so the
plain engine (one image) and the batched engine (n images, each with its own weights) call the same
code: the pooling (GAP, GNDRP Eq. 3), the loss L_RIB with its margin variants, the explosion and
margin stopping rules, and the accumulation of the map M over the iterates theta_k.
"""

from __future__ import annotations

import torch

from rib_core.classifier.cam import normalise_per_class
from rib_core.config.rib_config import MAX_LR, RibConfig

STOP_REASONS = ("iterations", "margin", "explosion")


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
    """The logits y of raw CAMs [B, C, h, w] under the configured pooling: [B, C]."""
    if cfg.pooling == "gap":
        return gap(raw)
    return gndrp(raw, labels, cfg.tau, cfg.gndrp_denominator, cfg.gndrp_classes)


def pool_images(raw: torch.Tensor, labels: torch.Tensor, cfg: RibConfig) -> torch.Tensor:
    """:func:`pool` over n images' rows at once: [n, R, C, h, w] CAMs, [n, R, C] labels -> [n, R, C]."""
    return pool(raw.flatten(0, 1), labels.flatten(0, 1), cfg).unflatten(0, labels.shape[:2])


def margin_clamped(logits: torch.Tensor, cfg: RibConfig) -> torch.Tensor:
    """The paper's min(m, y^c) (``margin_mode="clamp"``); the official code leaves y as it is."""
    return logits.clamp(max=cfg.margin) if cfg.margin_mode == "clamp" else logits


def rib_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_RIB = -sum_c t_c y^c over every row of each image: [n, R, C] -> [n], no sigmoid."""
    return -(logits * labels).sum(dim=(1, 2))


def first_step_lr(logits: torch.Tensor, labels: torch.Tensor, grad_sq: torch.Tensor, gain: float) -> torch.Tensor:
    """[n]: each image's step size under ``lr_rule="first_step"``: the lambda whose first SGD step
    lowers L_RIB, to first order (lambda x ``grad_sq``), by ``gain`` x the sum of |labelled logits|
    of its rows (at most ``MAX_LR``). Both sides scale with the logits, so the step carries over
    between classifiers whose logits or gradients have another scale; ``grad_sq`` [n] is the squared
    gradient norm with each parameter group weighted by its lr multiplier
    (:meth:`rib_engines.Engine.weighted_grad_sq`)."""
    magnitude = (logits.detach() * labels).abs().sum(dim=(1, 2))
    return (gain * magnitude / grad_sq.clamp_min(torch.finfo(grad_sq.dtype).tiny)).clamp(max=MAX_LR)


def target_logit_sum(logits: torch.Tensor, labels: torch.Tensor, target_rows: int) -> torch.Tensor:
    """[n]: each image's labelled logits summed over its own rows (the first ``target_rows``: loss
    scales x flips), without the companions; what the margin rule reads."""
    return (logits[:, :target_rows] * labels[:, :target_rows]).detach().sum(dim=(1, 2))


def margin_reached(target_sum: torch.Tensor, cfg: RibConfig) -> torch.Tensor:
    """[n] bool: the official stop after the step where |sum of target logits| > m (``stop_th``);
    never in the paper's mode, which clamps the logits instead."""
    if cfg.margin_mode != "stop":
        return torch.zeros_like(target_sum, dtype=torch.bool)
    return target_sum.abs() > cfg.margin


def exploded(fused: torch.Tensor, key_mask: torch.Tensor, cfg: RibConfig) -> torch.Tensor:
    """[N, C, h, w] maps, [N, C] bool target classes -> [N] bool: the target's classes together
    cover more than ``explode_ratio`` of the map (official rule, checked on scale 1.0)."""
    norm = normalise_per_class(fused)
    covered = ((norm > cfg.explode_threshold) & key_mask[:, :, None, None]).any(dim=1)
    return covered.float().mean(dim=(1, 2)) > cfg.explode_ratio


class IterateSum:
    """M before assembly: per scale, the sum over the iterates theta_k of the flip-fused CAMs
    (paper: M = sum_k CAM(x; theta_k)), [n, C, h, w] each."""

    def __init__(self, scales: int) -> None:
        self.per_scale: list[torch.Tensor | None] = [None] * scales

    def add(self, scale: int, fused: torch.Tensor) -> None:
        current = self.per_scale[scale]
        self.per_scale[scale] = fused if current is None else current + fused

    def image(self, j: int) -> list[torch.Tensor]:
        return [s[j] for s in self.per_scale if s is not None]


def takes_last_iterate(cfg: RibConfig, stop_reason: torch.Tensor) -> torch.Tensor | None:
    """[n] bool: which images' M also gets the CAM of the last iterate theta_K (the paper's
    M = sum over 0 <= k <= K, ``map_iterates="all_iterates"``), or None in the official mode, which
    sums the CAMs seen before each update only. An image stopped by the explosion rule never does."""
    if cfg.map_iterates != "all_iterates":
        return None
    return stop_reason != STOP_REASONS.index("explosion")
