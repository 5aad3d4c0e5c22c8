"""Training IRN on confident labels (RIB/IRN ``step/train_irn.py``).

IRN learns class boundaries and displacements on a frozen backbone. The official code freezes an
ImageNet ResNet-50; a random frozen backbone learns nothing, so training refuses to start without
backbone weights: ``init_weights`` when given, else the classifier's own backbone (the checkpoint
the maps came from). ``docs/FIDELITY.md`` records this choice.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rib_core import augment
from rib_core.checkpoints import load_backbone
from rib_core.classes import IGNORE_INDEX
from rib_core.datasets import Manifest, ManifestRecord, load_image, load_mask
from rib_core.irn import IrnNet, PathIndex, irn_loss, save_irn
from rib_core.optim import PolySGD, irn_param_groups
from rib_core.training import AugmentedManifest, epoch_loader, progress_bar, steps_per_epoch, train_one_epoch


class IrnTrainConfig(BaseModel):
    """IRN training; defaults are the RIB/IRN ``run_sample.py`` and ``step/train_irn.py`` ones."""

    model_config = ConfigDict(extra="forbid")

    arch: str = Field("resnet50", description="backbone (IRN: resnet50)")
    # IRN starts from ImageNet weights (resnet50(pretrained=True)). Give a torchvision state dict or
    # a classifier checkpoint (ours or IRN's res50_cam.pth) whose backbone to use; None = the
    # classifier passed to train_irn / refine_maps (never a random backbone: see irn_backbone).
    init_weights: str | None = None
    crop_size: int = Field(512, ge=32, multiple_of=16)  # --irn_crop_size 512
    batch_size: int = Field(32, ge=1)                    # --irn_batch_size 32
    epochs: int = Field(3, ge=1)                         # --irn_num_epoches 3
    lr: float = Field(0.1, gt=0)                         # --irn_learning_rate 0.1 (x10 on the displacement head)
    weight_decay: float = Field(1e-4, ge=0)              # --irn_weight_decay 1e-4
    momentum: float = Field(1e-4, ge=0)                  # PolyOptimizer passes weight_decay as momentum (optim.py)
    poly_power: float = Field(0.9, gt=0)                 # PolyOptimizer's exponent
    radius: int = Field(10, ge=2, le=20)                 # train_irn.py PathIndex(radius=10)
    rescale: tuple[float, float] = (0.5, 1.5)            # VOC12AffinityDataset rescale=(0.5, 1.5)
    hflip: bool = True                                   # hor_flip=True
    num_workers: int = Field(0, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _crop_fits_radius(self) -> IrnTrainConfig:
        side = self.crop_size // 4  # the networks' stride-4 map
        if side <= 2 * (self.radius - 1):
            raise ValueError(f"crop_size {self.crop_size} gives a {side}x{side} map, too small for radius "
                             f"{self.radius}: use radius <= {side // 2} or a larger crop")
        return self


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
              classifier: str | os.PathLike[str] | None = None) -> Path:
    """Train IRN on confident labels ``label_dir/<id>.png``; writes and returns ``out_dir/irn.pth``.

    The frozen backbone is ``cfg.init_weights``, else ``classifier``'s (:func:`irn_backbone`).
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
    model.to(device).train()

    def step_loss(batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        edge, dp = model(batch["img"].to(device))
        return irn_loss(edge, dp, batch["bg_pos"].to(device), batch["fg_pos"].to(device), batch["neg"].to(device),
                        index)

    history: list[dict[str, float]] = []
    for epoch in range(cfg.epochs):
        dataset.epoch = epoch
        loader = epoch_loader(dataset, cfg.batch_size, cfg.seed, epoch, cfg.num_workers)
        with progress_bar(steps, f"train irn {epoch + 1}/{cfg.epochs}", progress) as bar:
            sums = train_one_epoch(loader, step_loss, optimizer, bar)
        history.append({"epoch": epoch + 1, **{k: v / steps for k, v in sums.items()}})
    model.dp_mean.copy_(displacement_mean(model, manifest, cfg.crop_size, device))
    path = out / "irn.pth"
    save_irn(model.cpu(), path, extra={"config": cfg.model_dump(), "backbone": backbone, "history": history,
                                       "steps": optimizer.global_step})
    return path
