"""Train the initial multi-label classifier: IRN's ``step/train_cam.py`` recipe.

Multilabel soft-margin loss, poly SGD with 10x learning rate on the classifier, random
resize-long, flip and crop. Checkpoints after every epoch; ``resume`` continues a run where it
stopped, with the same optimiser state and data order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import DataLoader
from tqdm import tqdm

from rib_core.checkpoints import save_atomically, save_classifier
from rib_core.datasets import ClassificationDataset, Manifest
from rib_core.networks import CamNet
from rib_core.optim import PolySGD, irn_param_groups


class ClassifierTrainConfig(BaseModel):
    """Classifier training; defaults are IRN's (``run_sample.py`` and ``step/train_cam.py``)."""

    model_config = ConfigDict(extra="forbid")

    arch: str = Field("resnet50", description="backbone: resnet18/34/50/101 (IRN: resnet50)")
    batch_size: int = Field(16, ge=1)        # IRN run_sample.py --cam_batch_size 16
    epochs: int = Field(5, ge=1)             # --cam_num_epoches 5
    lr: float = Field(0.1, gt=0)             # --cam_learning_rate 0.1 (x10 on the classifier)
    weight_decay: float = Field(1e-4, ge=0)  # --cam_weight_decay 1e-4
    momentum: float = Field(1e-4, ge=0)      # what IRN's PolyOptimizer really passes to SGD (optim.py)
    poly_power: float = Field(0.9, gt=0)     # PolyOptimizer's exponent
    crop_size: int = Field(512, ge=16)       # train_cam.py crop_size=512
    resize_long: tuple[int, int] = (320, 640)  # train_cam.py resize_long=(320, 640)
    hflip: bool = True
    # IRN fine-tunes ImageNet weights: stem frozen, stage 2 detached, BN statistics frozen. From
    # scratch (the demo: no ImageNet weights here) every stage must learn, with batch statistics
    # that are then frozen for CAM and RIB. See CamNet.set_from_scratch.
    from_scratch: bool = False
    init_weights: str | None = Field(None, description="backbone weights (torchvision ResNet state dict), path or s3://")
    num_workers: int = Field(0, ge=0)
    seed: int = 0


def _load_backbone(model: CamNet, uri: str) -> None:
    import io

    from rib_core.storage import read_bytes

    state = torch.load(io.BytesIO(read_bytes(uri)), map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("fc.")]:
        raise ValueError(f"{uri} is not a torchvision {model.arch} state dict "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def train_classifier(manifest: Manifest, out_dir: str | os.PathLike[str],
                     cfg: ClassifierTrainConfig | None = None, device: str = "cpu",
                     resume: bool = True, progress: bool = True, stop_after_epoch: int | None = None) -> Path:
    """Train and write ``out_dir/classifier.pth`` (our format). Returns its path.

    ``stop_after_epoch`` ends this call early (a preemptible slot): the training state is saved and
    its path returned; a later call with ``resume`` continues the same run.
    """
    cfg = cfg or ClassifierTrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final, state_path = out / "classifier.pth", out / "train_state.pth"
    torch.manual_seed(cfg.seed)
    model = CamNet(len(manifest.classes), cfg.arch)
    if cfg.init_weights:
        _load_backbone(model, cfg.init_weights)
    model.set_from_scratch(cfg.from_scratch)
    dataset = ClassificationDataset(manifest, cfg.crop_size, cfg.resize_long, cfg.hflip, cfg.seed)
    steps_per_epoch = len(dataset) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} images is fewer than one batch of {cfg.batch_size}")
    backbone, head = model.param_groups()
    optimizer = PolySGD(irn_param_groups(backbone, head, cfg.lr, cfg.weight_decay),
                        max_step=steps_per_epoch * cfg.epochs, power=cfg.poly_power, momentum=cfg.momentum)
    start_epoch = 0
    if resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"]
    model.to(device).train()
    history: list[dict[str, Any]] = []
    for epoch in range(start_epoch, cfg.epochs):
        dataset.epoch = epoch
        loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                            num_workers=cfg.num_workers,
                            generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        bar = tqdm(loader, desc=f"train classifier {epoch + 1}/{cfg.epochs}", disable=not progress, unit="batch")
        total = 0.0
        for batch in bar:
            logits = model.logits(batch["img"].to(device))
            loss = F.multilabel_soft_margin_loss(logits, batch["label"].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        history.append({"epoch": epoch + 1, "loss": total / steps_per_epoch})
        save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1},
                        state_path)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < cfg.epochs:
            return state_path
    model.set_from_scratch(False)  # CAM and RIB always run in IRN's layout
    save_classifier(model.cpu(), manifest.classes, final, extra={"config": cfg.model_dump(), "history": history})
    return final
