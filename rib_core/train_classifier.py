"""Train the initial multi-label classifier: IRN's ``step/train_cam.py`` recipe, or one from scratch.

``recipe="irn"`` (the default, for real data with ImageNet weights): multilabel soft-margin loss,
poly SGD with 10x learning rate on the classifier, random resize-long, flip and crop.
``recipe="scratch"`` (no ImageNet weights, e.g. the demo): the same loss and crops, every stage
trained with batch statistics, AdamW with a linear warm-up then a cosine decay, and colour
augmentation; its defaults were chosen by measurement (README, benchmarks/classifier_recipes.py).
Checkpoints after every epoch; ``resume`` continues a run where it stopped, with the same
optimiser state and data order. With a validation manifest, every epoch is scored
(:mod:`rib_core.classifier_eval`) into ``train_report.json`` and the final checkpoint records it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from rib_core.checkpoints import load_backbone, save_atomically, save_classifier
from rib_core.classifier_data import ClassificationDataset
from rib_core.classifier_eval import evaluate_classifier
from rib_core.datasets import Manifest, load_manifest
from rib_core.networks import CamNet
from rib_core.optim import PolySGD, irn_param_groups
from rib_core.stage_configs import SCRATCH_RECIPE, ClassifierTrainConfig

__all__ = ["SCRATCH_RECIPE", "ClassifierTrainConfig", "train_classifier"]

class _WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """Linear warm-up over ``warmup`` steps, then a cosine decay to 0 at ``total`` steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: int, total: int) -> None:
        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        super().__init__(optimizer, factor)


def _optimiser(model: CamNet, cfg: ClassifierTrainConfig, steps_per_epoch: int,
               ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    backbone, head = model.param_groups()
    total = steps_per_epoch * cfg.epochs
    if cfg.recipe == "irn":
        return PolySGD(irn_param_groups(backbone, head, cfg.lr, cfg.weight_decay), max_step=total,
                       power=cfg.poly_power, momentum=cfg.momentum), None
    optimizer = torch.optim.AdamW([*backbone, *head], lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optimizer, _WarmupCosine(optimizer, round(cfg.warmup_epochs * steps_per_epoch), total)


def colour_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image: a random order of the colour channels, and greyscale with probability 0.2.

    Scenes differ in colour (grey or coloured digits, any background hue); the digit is in the
    shape, so the classifier is made blind to hue.
    """
    b = x.shape[0]
    order = torch.argsort(torch.rand(b, 3, generator=generator), dim=1).to(x.device)
    x = torch.gather(x, 1, order[:, :, None, None].expand_as(x))
    grey = (torch.rand(b, generator=generator) < 0.2).to(x.device)
    return torch.where(grey[:, None, None, None], x.mean(1, keepdim=True).expand_as(x), x)


def train_classifier(manifest: Manifest, out_dir: str | os.PathLike[str],
                     cfg: ClassifierTrainConfig | None = None, device: str = "cpu",
                     resume: bool = True, progress: bool = True, stop_after_epoch: int | None = None,
                     val_manifest: str | os.PathLike[str] | None = None) -> Path:
    """Train and write ``out_dir/classifier.pth`` (our format). Returns its path.

    ``val_manifest`` (path or s3:// URI of a labelled manifest): scored after every epoch into
    ``out_dir/train_report.json`` and the progress bar; the checkpoint's ``extra["validation"]``
    records the last epoch's scores and the manifest. ``stop_after_epoch`` ends this call early (a
    preemptible slot): the training state is saved and its path returned; a later call with
    ``resume`` continues the same run.
    """
    cfg = cfg or ClassifierTrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final, state_path, report_path = out / "classifier.pth", out / "train_state.pth", out / "train_report.json"
    val = load_manifest(val_manifest) if val_manifest is not None else None
    if val is not None and val.classes != manifest.classes:
        raise ValueError(f"the validation manifest's classes {val.classes} differ from the training "
                         f"manifest's {manifest.classes}")
    torch.manual_seed(cfg.seed)
    model = CamNet(len(manifest.classes), cfg.arch)
    if cfg.init_weights:
        load_backbone(model.backbone, model.arch, cfg.init_weights)
    model.set_from_scratch(cfg.from_scratch)
    dataset = ClassificationDataset(manifest, cfg.crop_size, cfg.resize_long, cfg.hflip, cfg.seed)
    steps_per_epoch = len(dataset) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} images is fewer than one batch of {cfg.batch_size}")
    optimizer, scheduler = _optimiser(model, cfg, steps_per_epoch)
    start_epoch, history = 0, []
    if resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"], state.get("history", [])
    model.to(device).train()
    report: dict[str, Any] = {"config": cfg.model_dump(), "val_manifest": None if val is None else str(val_manifest),
                              "epochs": history}
    for epoch in range(start_epoch, cfg.epochs):
        dataset.epoch = epoch
        loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                            num_workers=cfg.num_workers,
                            generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        colour_rng = torch.Generator().manual_seed(cfg.seed * 1000 + epoch + 1)
        total = 0.0
        with tqdm(total=steps_per_epoch, desc=f"train classifier {epoch + 1}/{cfg.epochs}", disable=not progress,
                  unit="batch") as bar:
            for batch in loader:
                x = batch["img"].to(device)
                if cfg.colour_augment:
                    x = colour_augment(x, colour_rng)
                loss = F.multilabel_soft_margin_loss(model.logits(x), batch["label"].to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                total += loss.item()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}")
            row: dict[str, Any] = {"epoch": epoch + 1, "loss": total / steps_per_epoch}
            if val is not None:
                scores = evaluate_classifier(model, val, device)
                row.update(val_loss=scores["loss"], map=scores["map"], f1=scores["f1"], ap=scores["ap"],
                           f1_per_class=scores["f1_per_class"], images=scores["images"])
                bar.set_postfix(loss=f"{row['loss']:.4f}", val_mAP=f"{100 * scores['map']:.1f}",
                                F1=f"{100 * scores['f1']:.1f}")
        history.append(row)
        report_path.write_text(json.dumps(report, indent=2))
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                 "history": history}
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        save_atomically(state, state_path)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < cfg.epochs:
            return state_path
    extra: dict[str, Any] = {"config": cfg.model_dump(), "history": history}
    last = history[-1] if history else {}
    if val is not None and "map" in last:
        extra["validation"] = {"manifest": str(val_manifest), "epoch": last["epoch"], "images": last["images"],
                               "map": last["map"], "f1": last["f1"], "ap": last["ap"]}
    model.set_from_scratch(False)  # CAM and RIB always run in IRN's layout
    save_classifier(model.cpu(), manifest.classes, final, extra=extra)
    return final
