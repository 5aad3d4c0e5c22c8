"""DeepLab trained on pseudo-masks, and re-trained (appendix A.1), on the shared training skeleton.

The recipe is the paper's appendix A.1 on top of the DeepLab-v2 code it used
(kazuto1011/deeplab-pytorch ``main.py`` and ``configs/voc12.yaml``): SGD with momentum, poly
learning rate, 10x / 20x rates on the head, the loss and augmentation of
:mod:`rib_core.deeplab.data`. Under ``torchrun`` a ``DistributedSampler`` splits each global batch
over the processes (:mod:`rib_core.training.loop`).

A run is resumable: every ``checkpoint_every`` steps the model, optimizer (with its step), grad
scaler, every rank's RNG state and the loss history are written, and a new call with the same
output folder continues the same run, giving the same weights as an uninterrupted one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from rib_core.config.network_configs import DeepLabTrainConfig
from rib_core.data.classes import IGNORE_INDEX
from rib_core.data.datasets import Manifest, ManifestRecord, load_image, load_mask
from rib_core.deeplab.data import SegmentationTrainSet, segmentation_loss
from rib_core.deeplab.inference import predict_mask
from rib_core.deeplab.model import DeepLab, load_deeplab, load_initial_weights, save_deeplab
from rib_core.io.storage import LocalStorage
from rib_core.io.visualize import label_png
from rib_core.training.loop import (
    autocast,
    barrier,
    distributed,
    epoch_loader,
    progress_bar,
    rank_device,
    read_training_state,
    restore_trainer,
    rng_states_of_all_ranks,
    save_training_state,
    set_rng_state,
    steps_per_epoch,
    train_one_epoch,
    trainer_state,
)
from rib_core.training.optim import PolySGD

OnCheckpoint = Callable[[Path], None]
OnLog = Callable[[dict[str, float]], None]  # each logged entry ({step, loss}; round when re-training)

# Settings that define a run: a resumed run must use the same ones.
RUN_FIELDS = ("model", "arch", "atrous_rates", "msc_scales", "freeze_bn", "init_weights", "batch_size",
              "iterations", "lr", "head_lr_mult", "momentum", "weight_decay", "poly_power", "crop_size",
              "scales", "hflip", "seed")


def build_model(cfg: DeepLabTrainConfig, num_labels: int) -> DeepLab:
    """The configured network with its initial weights (``num_labels`` = classes + background)."""
    model = DeepLab(num_labels, cfg.model, cfg.arch, cfg.atrous_rates, cfg.msc_scales, cfg.freeze_bn)
    if cfg.init_weights:
        load_initial_weights(model, cfg.init_weights)
    return model


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step_*.pth"))


@dataclass
class _Run:
    """One rank's share of a training run: its trainables and what the steps have recorded."""

    cfg: DeepLabTrainConfig
    out: Path
    device: torch.device
    world: int
    rank: int
    model: DeepLab
    optimizer: PolySGD
    scaler: torch.amp.GradScaler
    on_checkpoint: OnCheckpoint | None
    on_log: OnLog | None = None
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    window: list[float] = field(default_factory=lambda: [0.0, 0])  # loss sum and steps since the last log

    def resume(self, path: Path) -> None:
        """Continue from the training state at ``path``, which must be of this run's settings."""
        state = read_training_state(path, ("config", "model", "step"))
        changed = [k for k in RUN_FIELDS if state["config"].get(k) != getattr(self.cfg, k)]
        if changed:
            raise ValueError(f"{path} belongs to a run with other settings ({', '.join(changed)}); "
                             "use another output folder or the same settings")
        if state["world_size"] != self.world:
            raise ValueError(f"{path} was written by {state['world_size']} processes, this run has {self.world}")
        restore_trainer(state, self.model, self.optimizer, scaler=self.scaler)
        set_rng_state(state["rng"][self.rank], self.device)
        self.step, self.history, self.window = state["step"], state["history"], state["window"]

    def after_step(self, loss: float) -> bool:
        """Log, checkpoint; True once the last iteration is done."""
        cfg = self.cfg
        self.step += 1
        self.window = [self.window[0] + loss, self.window[1] + 1]
        if self.step % cfg.log_every == 0 or self.step == cfg.iterations:
            self.history.append({"step": self.step, "loss": self.window[0] / self.window[1]})
            self.window = [0.0, 0]
            if self.on_log is not None and self.rank == 0:
                self.on_log(self.history[-1])
        if self.step % cfg.checkpoint_every == 0 or self.step == cfg.iterations:
            self.save_state()
        return self.step == cfg.iterations

    def save_state(self) -> None:
        """Rank 0 writes the training state with every rank's RNG state; the oldest beyond
        ``keep_checkpoints`` are deleted."""
        rngs = rng_states_of_all_ranks(self.device)
        if self.rank != 0:
            return
        path = self.out / "checkpoints" / f"step_{self.step:08d}.pth"
        save_training_state({**trainer_state(self.model, self.optimizer, scaler=self.scaler), "step": self.step,
                             "history": self.history, "window": self.window, "rng": rngs, "world_size": self.world,
                             "config": self.cfg.model_dump(mode="json")}, path)
        for old in _checkpoints(self.out)[:-self.cfg.keep_checkpoints]:
            old.unlink()
        if self.on_checkpoint is not None:
            self.on_checkpoint(path)


def _start_run(manifest: Manifest, out: Path, cfg: DeepLabTrainConfig, device: torch.device, world: int,
               rank: int, resume: bool, on_checkpoint: OnCheckpoint | None, on_log: OnLog | None) -> _Run:
    """The network, optimizer and scaler, seeded as deeplab-pytorch does; resumed from the last
    training state under ``out`` when there is one and ``resume``."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, len(manifest.classes) + 1).to(device)
    optimizer = PolySGD(model.param_groups(cfg.lr, cfg.weight_decay, cfg.head_lr_mult), max_step=cfg.iterations,
                        power=cfg.poly_power, momentum=cfg.momentum)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp == "fp16")
    torch.manual_seed(cfg.seed + rank)  # each rank its own stream (dropout in DeepLabV3's head)
    run = _Run(cfg, out, device, world, rank, model, optimizer, scaler, on_checkpoint, on_log)
    states = _checkpoints(out) if resume else []
    if states:
        run.resume(states[-1])
    return run


def train_deeplab(manifest: Manifest, out_dir: str | os.PathLike[str], cfg: DeepLabTrainConfig | None = None,
                  device: str | torch.device = "cpu", resume: bool = True, progress: bool = True,
                  on_checkpoint: OnCheckpoint | None = None, on_log: OnLog | None = None) -> dict[str, Any]:
    """Train on the manifest's masks; writes ``out_dir/deeplab.pth`` and training states under
    ``out_dir/checkpoints/``. Under torchrun every rank calls this; rank 0 writes.

    Returns ``{"checkpoint", "steps", "world_size", "history"}``; ``history`` holds the mean loss of
    every ``log_every`` steps (over all ranks). ``on_checkpoint(path)`` is called (rank 0) after
    each training state is written, e.g. to upload it; ``on_log(entry)`` (rank 0) with each new
    history entry, e.g. to show progress (it may raise to stop the run; the last state stays).
    """
    cfg = cfg or DeepLabTrainConfig()
    out = Path(out_dir)
    device = rank_device(device)
    with distributed(device) as (world, rank):
        if cfg.batch_size % world:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
        per_rank = cfg.batch_size // world
        dataset = SegmentationTrainSet(manifest, cfg)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                     drop_last=True)
        steps = steps_per_epoch(len(dataset), cfg.batch_size, world)
        run = _start_run(manifest, out, cfg, device, world, rank, resume, on_checkpoint, on_log)
        net: torch.nn.Module = run.model
        if world > 1:
            net = DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda" else None)
        net.train()

        def step_loss(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
            with autocast(cfg.amp, device):
                outputs = net(batch["img"].to(device, non_blocking=True))
            return segmentation_loss(outputs, batch["label"]), {}

        with progress_bar(cfg.iterations, "train deeplab", progress and rank == 0, run.step, "step") as bar:
            while run.step < cfg.iterations:
                epoch, offset = divmod(run.step, steps)
                sampler.set_epoch(epoch)
                dataset.epoch = epoch
                order = list(sampler)[offset * per_rank:steps * per_rank]
                loader = epoch_loader(dataset, per_rank, cfg.seed, epoch, cfg.num_workers, sampler=order,
                                      pin_memory=device.type == "cuda")
                train_one_epoch(loader, step_loss, run.optimizer, bar, scaler=run.scaler, after_step=run.after_step)
        final = out / "deeplab.pth"
        if rank == 0:
            save_deeplab(run.model, manifest.classes, final,
                         extra={"config": cfg.model_dump(mode="json"), "history": run.history, "steps": run.step,
                                "world_size": world})
        barrier()
    return {"checkpoint": str(final), "steps": run.step, "world_size": world, "history": run.history}


# ----------------------------------------------------------------------------- re-training (appendix A.1)

def fill_ignored(labels: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Second-round labels: the ignored (255) pixels take the first network's prediction."""
    if labels.shape != prediction.shape:
        raise ValueError(f"labels are {labels.shape} but the prediction is {prediction.shape}")
    return np.where(labels == IGNORE_INDEX, prediction, labels).astype(np.uint8)


def _second_round_manifest(manifest: Manifest, todo: list[ManifestRecord], checkpoint: str, out: Path,
                           cfg: DeepLabTrainConfig, device: torch.device, world: int, rank: int,
                           progress: bool) -> Manifest:
    """The manifest with the masks of ``todo`` replaced by filled ones (``out/filled/<id>.png``,
    each rank filling its share), saved by rank 0 as ``out/filled.jsonl``."""
    model, _, _ = load_deeplab(checkpoint)
    model.to(device)
    filled = LocalStorage(out / "filled")
    for r in tqdm(todo[rank::world], desc="fill ignored pixels", unit="img", disable=not progress or rank):
        label = load_mask(manifest.mask_uri(r))
        prediction = predict_mask(model, load_image(manifest.image_uri(r)), cfg, device)
        filled.put(f"{r.id}.png", label_png(fill_ignored(label, prediction)), "image/png")
    barrier()
    todo_ids = {r.id for r in todo}
    second = Manifest(manifest.classes, [
        replace(r, image=manifest.image_uri(r), mask=filled.uri(f"{r.id}.png") if r.id in todo_ids
                else manifest.mask_uri(r)) for r in manifest.records], str(out))
    if rank == 0:
        second.save(out / "filled.jsonl")
    return second


def train_with_retraining(manifest: Manifest, out_dir: str | os.PathLike[str], cfg: DeepLabTrainConfig | None = None,
                          device: str | torch.device = "cpu", resume: bool = True, progress: bool = True,
                          on_checkpoint: OnCheckpoint | None = None, on_log: OnLog | None = None) -> dict[str, Any]:
    """Appendix A.1's two rounds: train on the manifest's masks (255 = uncertain), fill their
    ignored pixels from that network's predictions, train again on the filled masks.

    Writes ``round1/``, ``filled/<id>.png`` with ``filled.jsonl``, ``round2/`` and ``deeplab.pth``
    (the second network). When no mask has an ignored pixel there is nothing to fill, and the
    first network is the result. ``on_log`` entries carry their ``round`` (1 or 2).
    """
    cfg = cfg or DeepLabTrainConfig()
    out = Path(out_dir)
    device = rank_device(device)
    with distributed(device) as (world, rank):
        def logged(round_: int) -> OnLog | None:
            return None if on_log is None else lambda entry: on_log({**entry, "round": round_})

        first = train_deeplab(manifest, out / "round1", cfg, device, resume, progress, on_checkpoint, logged(1))
        result: dict[str, Any] = {"rounds": [first]}
        todo = [r for r in manifest.records if (load_mask(manifest.mask_uri(r)) == IGNORE_INDEX).any()]
        result["filled_images"] = len(todo)
        if todo:
            second_manifest = _second_round_manifest(manifest, todo, first["checkpoint"], out, cfg, device, world,
                                                     rank, progress)
            second_cfg = cfg if cfg.retrain_init == "initial" else cfg.model_copy(
                update={"init_weights": first["checkpoint"]})
            result["rounds"].append(train_deeplab(second_manifest, out / "round2", second_cfg, device, resume,
                                                  progress, on_checkpoint, logged(2)))
        final = out / "deeplab.pth"
        if rank == 0:
            final.write_bytes(Path(result["rounds"][-1]["checkpoint"]).read_bytes())
        barrier()
    last = result["rounds"][-1]
    return {**result, "checkpoint": str(final), "steps": last["steps"], "world_size": last["world_size"],
            "history": last["history"]}
