"""Train the initial multi-label classifier: IRN's ``step/train_cam.py`` recipe, or one from scratch.

``recipe="irn"`` (the default, for real data with ImageNet weights): multilabel soft-margin loss,
poly SGD with 10x learning rate on the classifier, random resize-long, flip and crop.
``recipe="scratch"`` (no ImageNet weights, e.g. the demo): the same loss and crops, every stage
trained with batch statistics, AdamW with a linear warm-up then a cosine decay, and colour
augmentation; its defaults were chosen by measurement (docs/RESULTS.md notes, benchmarks/classifier_recipes.py).
Checkpoints after every epoch; ``resume`` continues a run where it stopped, with the same
optimiser state and data order. With a validation manifest, every epoch is scored
(:mod:`rib_core.classifier.evaluate`) into ``train_report.json`` and the final checkpoint records it.

``stop="plateau"`` sets the length by that validation curve (:func:`plateau`): ``epochs`` becomes the
most epochs, training ends once mAP has not risen by ``min_delta`` for ``patience`` epochs, and the
best epoch's weights are the ones written. The learning-rate schedule keeps spanning ``epochs``
(cosine or poly decay over the maximum), so every epoch the rule runs is the same as in a fixed
run of the maximal length: the rule only cuts that run short where the curve is flat, and an
epoch's weights never depend on the validation set. A schedule that decays on a plateau would
let the validation images shape the training itself and make the curve the rule watches jump
where the decay starts.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rib_core.classifier.data import ClassificationDataset
from rib_core.classifier.evaluate import evaluate_classifier
from rib_core.config.network_configs import SCRATCH_RECIPE, ClassifierTrainConfig
from rib_core.data.datasets import Manifest, load_manifest
from rib_core.training.checkpoints import load_backbone, save_classifier
from rib_core.training.loop import (
    epoch_loader,
    progress_bar,
    read_training_state,
    restore_trainer,
    rng_state,
    save_training_state,
    set_rng_state,
    steps_per_epoch,
    train_one_epoch,
    trainer_state,
)
from rib_core.training.networks import CamNet
from rib_core.training.optim import PolySGD, irn_param_groups

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


def build_classifier(cfg: ClassifierTrainConfig, num_classes: int) -> CamNet:
    """The network to train, with its initial backbone weights when ``init_weights`` names some."""
    model = CamNet(num_classes, cfg.arch)
    if cfg.init_weights:
        load_backbone(model.backbone, model.arch, cfg.init_weights)
    model.set_from_scratch(cfg.from_scratch)
    return model


def _validation_scores(model: CamNet, val: Manifest, device: str) -> dict[str, Any]:
    """The epoch's report row entries from scoring the validation manifest."""
    scores = evaluate_classifier(model, val, device)
    return {"val_loss": scores["loss"], "map": scores["map"], "f1": scores["f1"], "ap": scores["ap"],
            "f1_per_class": scores["f1_per_class"], "images": scores["images"]}


def _train_epoch(model: CamNet, dataset: ClassificationDataset, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None, cfg: ClassifierTrainConfig, epoch: int,
                 steps: int, val: Manifest | None, device: str, progress: bool) -> dict[str, Any]:
    """One epoch then, with a validation manifest, its scores: the epoch's report row."""
    dataset.epoch = epoch
    loader = epoch_loader(dataset, cfg.batch_size, cfg.seed, epoch, cfg.num_workers)
    colour_rng = torch.Generator().manual_seed(cfg.seed * 1000 + epoch + 1)

    def step_loss(batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["img"].to(device)
        if cfg.colour_augment:
            x = colour_augment(x, colour_rng)
        return F.multilabel_soft_margin_loss(model.logits(x), batch["label"].to(device)), {}

    with progress_bar(steps, f"train classifier {epoch + 1}/{cfg.epochs}", progress) as bar:
        sums = train_one_epoch(loader, step_loss, optimizer, bar, scheduler=scheduler)
        row: dict[str, Any] = {"epoch": epoch + 1, "loss": sums["loss"] / steps}
        if val is not None:
            row.update(_validation_scores(model, val, device))
            bar.set_postfix(loss=f"{row['loss']:.4f}", val_mAP=f"{100 * row['map']:.1f}", F1=f"{100 * row['f1']:.1f}")
    return row


def plateau(maps: Sequence[float], patience: int, min_delta: float) -> tuple[int, bool]:
    """(the epoch to keep, whether training ends) after the validation mAPs ``maps`` of epochs 1..n.

    The kept epoch is the first with the highest mAP. An epoch counts as an improvement when it
    beats the mAP of the last improvement by more than ``min_delta`` (so a slow, steady rise still
    counts once it adds up); training ends ``patience`` epochs after the last improvement.
    """
    kept = max(range(len(maps)), key=lambda i: maps[i]) + 1 if maps else 0
    reference, improved = -math.inf, 0
    for epoch, value in enumerate(maps, 1):
        if value > reference + min_delta:
            reference, improved = value, epoch
    return kept, bool(maps) and len(maps) - improved >= patience


def _length(cfg: ClassifierTrainConfig, history: list[dict[str, Any]]) -> tuple[int, bool]:
    """:func:`plateau` of the run so far under ``cfg.stop`` (a fixed run keeps its last epoch)."""
    if cfg.stop == "fixed":
        return len(history), False
    return plateau([row["map"] for row in history], cfg.patience, cfg.min_delta)


def _save_classifier(model: CamNet, classes: list[str], cfg: ClassifierTrainConfig, history: list[dict[str, Any]],
                     kept: int, val_manifest: str | os.PathLike[str] | None, path: Path) -> Path:
    """The trained network in IRN's layout, with its config, history and the kept epoch's validation scores."""
    extra: dict[str, Any] = {"config": cfg.model_dump(), "history": history}
    row = history[kept - 1] if history else {}
    if val_manifest is not None and "map" in row:
        extra["validation"] = {"manifest": str(val_manifest), "epoch": row["epoch"], "epochs_run": len(history),
                               "images": row["images"], "map": row["map"], "f1": row["f1"], "ap": row["ap"]}
    model.set_from_scratch(False)  # CAM and RIB always run in IRN's layout
    save_classifier(model.cpu(), classes, path, extra=extra)
    return path


def train_classifier(manifest: Manifest, out_dir: str | os.PathLike[str],
                     cfg: ClassifierTrainConfig | None = None, device: str = "cpu",
                     resume: bool = True, progress: bool = True, stop_after_epoch: int | None = None,
                     val_manifest: str | os.PathLike[str] | None = None) -> Path:
    """Train and write ``out_dir/classifier.pth`` (our format). Returns its path.

    ``val_manifest`` (path or s3:// URI of a labelled manifest): scored after every epoch into
    ``out_dir/train_report.json`` and the progress bar; the checkpoint's ``extra["validation"]``
    records the kept epoch's scores (the last one's, or the best one's with ``stop="plateau"``, which
    needs it) and the manifest. ``stop_after_epoch`` ends this call early (a preemptible slot): the
    training state is saved and its path returned; a later call with ``resume`` continues the same
    run. The state holds the history and the best epoch's weights, all the rule needs on resuming.
    """
    cfg = cfg or ClassifierTrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path, report_path = out / "train_state.pth", out / "train_report.json"
    val = load_manifest(val_manifest) if val_manifest is not None else None
    if val is not None and val.classes != manifest.classes:
        raise ValueError(f"the validation manifest's classes {val.classes} differ from the training "
                         f"manifest's {manifest.classes}")
    if cfg.stop == "plateau" and val is None:
        raise ValueError("stop='plateau' ends training by the validation curve: give a validation manifest")
    torch.manual_seed(cfg.seed)
    model = build_classifier(cfg, len(manifest.classes))
    dataset = ClassificationDataset(manifest, cfg.crop_size, cfg.resize_long, cfg.hflip, cfg.seed)
    steps = steps_per_epoch(len(dataset), cfg.batch_size)
    optimizer, scheduler = _optimiser(model, cfg, steps)
    start_epoch, history, best = 0, [], None
    if resume and state_path.exists():
        state = read_training_state(state_path, ("model", "optimizer", "epoch"))
        restore_trainer(state, model, optimizer, scheduler)
        if "rng" in state:
            set_rng_state(state["rng"], torch.device(device))
        start_epoch, history, best = state["epoch"], state.get("history", []), state.get("best_model")
    model.to(device).train()
    kept, ended = _length(cfg, history)
    report = {"config": cfg.model_dump(), "val_manifest": None if val is None else str(val_manifest), "epochs": history}
    for epoch in range(start_epoch, cfg.epochs):
        if ended:
            break
        history.append(_train_epoch(model, dataset, optimizer, scheduler, cfg, epoch, steps, val, device, progress))
        kept, ended = _length(cfg, history)
        if cfg.stop == "plateau" and kept == epoch + 1:
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        report.update(epoch_kept=kept, ended_by_rule=ended)
        report_path.write_text(json.dumps(report, indent=2))
        save_training_state({**trainer_state(model, optimizer, scheduler), "epoch": epoch + 1, "history": history,
                             "best_model": best, "rng": rng_state(torch.device(device))}, state_path)
        if not ended and stop_after_epoch is not None and stop_after_epoch <= epoch + 1 < cfg.epochs:
            return state_path
    if best is not None and kept < len(history):
        model.load_state_dict(best)
    return _save_classifier(model, manifest.classes, cfg, history, kept, val_manifest, out / "classifier.pth")
