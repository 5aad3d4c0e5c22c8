"""Training IRN on confident labels (RIB/IRN ``step/train_irn.py``).

IRN learns class boundaries and displacements on a frozen backbone. The official code freezes an
ImageNet ResNet-50; a random frozen backbone learns nothing, so training refuses to start without
backbone weights: ``init_weights`` when given, else the classifier's own backbone (the checkpoint
the maps came from). ``docs/FIDELITY.md`` records this choice.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import rib_core.training.augment as augment
from rib_core.config.stage_configs import IrnTrainConfig
from rib_core.data.classes import IGNORE_INDEX
from rib_core.data.datasets import Manifest, ManifestRecord, load_image, load_mask
from rib_core.refine.irn import IrnNet, PathIndex, irn_loss, save_irn
from rib_core.training.checkpoints import load_backbone
from rib_core.training.loop import (
    AugmentedManifest,
    epoch_loader,
    progress_bar,
    read_training_state,
    restore_trainer,
    save_training_state,
    steps_per_epoch,
    train_one_epoch,
    trainer_state,
)
from rib_core.training.optim import PolySGD, irn_param_groups

IRN_STATE = "irn_state.pth"  # the training state after the last finished epoch


def irn_backbone(cfg: IrnTrainConfig, classifier: str | os.PathLike[str] | None) -> str:
    """Where IRN's frozen backbone comes from: ``init_weights``, else the classifier checkpoint.

    Raises ValueError when there is neither: a random frozen backbone gives boundaries that carry
    no information, and IRN's masks would silently be worse than the seeds they refine.
    """
    if cfg.init_weights:
        return cfg.init_weights
    if classifier:
        return str(classifier)
    raise ValueError("IRN needs backbone weights and got none: pass the classifier checkpoint the maps "
                     "came from (rib refine --classifier CKPT; refine_maps(classifier=...)) to use its "
                     "backbone, or set irn.init_weights to an ImageNet ResNet state dict (the official "
                     "code's choice); IRN on a random frozen backbone learns nothing")


class IrnDataset(AugmentedManifest):
    """IRN's ``VOC12AffinityDataset``: random scale, normalise, flip, crop, then pair labels from
    the label map reduced to stride 4."""

    def __init__(self, manifest: Manifest, label_dir: str | os.PathLike[str], cfg: IrnTrainConfig,
                 index: PathIndex) -> None:
        super().__init__(manifest, cfg.seed)
        self.label_dir = Path(label_dir)
        self.cfg = cfg
        self.index = index

    def sample(self, r: ManifestRecord, rng: random.Random) -> dict[str, Any]:
        img = load_image(self.manifest.image_uri(r))
        label = load_mask(str(self.label_dir / f"{r.id}.png"))
        img, label = augment.random_scale((img, label), self.cfg.rescale, rng)
        x = augment.normalize(img)
        if self.cfg.hflip:
            x, label = augment.random_lr_flip((x, label), rng)
        x, label = augment.crop((x, label), self.cfg.crop_size, (0.0, IGNORE_INDEX), rng)
        bg_pos, fg_pos, neg = self.index.pair_labels(augment.rescale(label, 0.25, nearest=True))
        return {"img": augment.to_chw(x), "bg_pos": torch.from_numpy(bg_pos), "fg_pos": torch.from_numpy(fg_pos),
                "neg": torch.from_numpy(neg)}


@torch.no_grad()
def displacement_mean(model: IrnNet, manifest: Manifest, crop_size: int, device: torch.device | str) -> torch.Tensor:
    """Mean displacement over top-left crops of every image: IRN's MeanShift statistics."""
    model.eval()
    model.dp_mean.zero_()
    means = []
    for r in manifest.records:
        (x,) = augment.crop((augment.normalize(load_image(manifest.image_uri(r))),), crop_size, (0.0,), None)
        _, dp = model(augment.to_chw(x)[None].to(device))
        means.append(dp.mean(dim=(0, 2, 3)).cpu())
    return torch.stack(means).mean(0)


def train_irn(manifest: Manifest, label_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
              cfg: IrnTrainConfig | None = None, device: torch.device | str = "cpu", progress: bool = True,
              classifier: str | os.PathLike[str] | None = None, resume: bool = True,
              after_epoch: Callable[[int], None] | None = None) -> Path:
    """Train IRN on confident labels ``label_dir/<id>.png``; writes and returns ``out_dir/irn.pth``.

    The frozen backbone is ``cfg.init_weights``, else ``classifier``'s (:func:`irn_backbone`). The
    training state is saved after every epoch (``out_dir/irn_state.pth``, atomically) and, with
    ``resume``, a later call with the same settings continues from it (a state of other settings is
    started over); ``after_epoch(epoch)`` runs once it is saved (a caller copies it elsewhere, or
    raises to stop). The checkpoint records the epoch it resumed from.
    """
    cfg = cfg or IrnTrainConfig()
    index = PathIndex(cfg.radius)
    dataset = IrnDataset(manifest, label_dir, cfg, index)
    steps = steps_per_epoch(len(dataset), cfg.batch_size)
    backbone = irn_backbone(cfg, classifier)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = IrnNet(cfg.arch, cfg.crop_size)
    load_backbone(model.backbone, model.arch, backbone)
    edge_params, dp_params = model.param_groups()
    optimizer = PolySGD(irn_param_groups(edge_params, dp_params, cfg.lr, cfg.weight_decay),
                        max_step=steps * cfg.epochs, power=cfg.poly_power, momentum=cfg.momentum)
    state_path = out / IRN_STATE
    start, history = 0, []
    state = read_training_state(state_path, ("model", "optimizer", "epoch", "history", "config")) \
        if resume and state_path.exists() else {}
    if state.get("config") == cfg.model_dump(mode="json"):  # a state of other settings is started over
        restore_trainer(state, model, optimizer)
        start, history = int(state["epoch"]), list(state["history"])
    model.to(device).train()

    def step_loss(batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        edge, dp = model(batch["img"].to(device))
        return irn_loss(edge, dp, batch["bg_pos"].to(device), batch["fg_pos"].to(device), batch["neg"].to(device),
                        index)

    for epoch in range(start, cfg.epochs):
        dataset.epoch = epoch
        loader = epoch_loader(dataset, cfg.batch_size, cfg.seed, epoch, cfg.num_workers)
        with progress_bar(steps, f"train irn {epoch + 1}/{cfg.epochs}", progress) as bar:
            sums = train_one_epoch(loader, step_loss, optimizer, bar)
        history.append({"epoch": epoch + 1, **{k: v / steps for k, v in sums.items()}})
        save_training_state({**trainer_state(model, optimizer), "epoch": epoch + 1, "history": history,
                             "config": cfg.model_dump(mode="json")}, state_path)
        if after_epoch is not None:
            after_epoch(epoch + 1)
    model.dp_mean.copy_(displacement_mean(model, manifest, cfg.crop_size, device))
    path = out / "irn.pth"
    save_irn(model.cpu(), path, extra={"config": cfg.model_dump(), "backbone": backbone, "history": history,
                                       "steps": optimizer.global_step, "resumed_from_epoch": start})
    return path
