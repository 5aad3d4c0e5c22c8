"""Offline DeepLab jobs: train on pseudo-masks, re-train (appendix A.1), evaluate, predict.

The recipe is the paper's appendix A.1 on top of the DeepLab-v2 code it used
(kazuto1011/deeplab-pytorch ``main.py`` and ``configs/voc12.yaml``): cross-entropy ignoring 255 on
each multi-scale output, SGD with momentum, poly learning rate, 10x / 20x rates on the head,
random scale / crop (labels padded with 255) / flip. The loop follows torchvision's
``references/segmentation`` layout: one process per device, ``torchrun`` sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``, and the process group starts from ``env://`` (nccl on CUDA, gloo
on the CPU) with a ``DistributedSampler`` splitting each global batch.

A run is resumable: every ``checkpoint_every`` steps the model, optimizer (with its step), grad
scaler, every rank's RNG state and the loss history are written, and a new call with the same
output folder continues the same run, giving the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from rib_core import augment
from rib_core.checkpoints import CheckpointError, read_checkpoint, save_atomically
from rib_core.classes import IGNORE_INDEX
from rib_core.crf import crf_probabilities
from rib_core.datasets import Manifest, load_image, load_manifest, load_mask
from rib_core.deeplab import DeepLab, load_deeplab, load_initial_weights, save_deeplab
from rib_core.evaluation import confusion, evaluate_masks, scores
from rib_core.optim import PolySGD
from rib_core.stage_configs import DeepLabTrainConfig
from rib_core.storage import LocalStorage, Storage, open_storage
from rib_core.visualize import label_png

# Settings that define a run: a resumed run must use the same ones.
RUN_FIELDS = ("model", "arch", "atrous_rates", "msc_scales", "freeze_bn", "init_weights", "batch_size",
              "iterations", "lr", "head_lr_mult", "momentum", "weight_decay", "poly_power", "crop_size",
              "scales", "hflip", "seed")


# ----------------------------------------------------------------------------- data

class SegmentationTrainSet(Dataset):
    """Images with their pseudo-masks, deeplab-pytorch's training augmentation.

    Random scale from ``scales`` (image bicubic, mask nearest), normalise, random crop with the
    image padded by its mean (0 after normalising) and the mask by 255, random flip. Each sample's
    randomness depends only on (seed, epoch, index), so a resumed run draws the same crops.
    """

    def __init__(self, manifest: Manifest, cfg: DeepLabTrainConfig) -> None:
        unlabelled = [r.id for r in manifest.records if r.mask is None]
        if unlabelled:
            raise ValueError(f"{len(unlabelled)} image(s) have no mask to train on, e.g. {unlabelled[:3]}")
        self.manifest = manifest
        self.cfg = cfg
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r = self.manifest[i]
        rng = random.Random(hash((self.cfg.seed, self.epoch, i)))
        img = load_image(self.manifest.image_uri(r))
        label = load_mask(self.manifest.mask_uri(r))
        if img.shape[:2] != label.shape:
            raise ValueError(f"{r.id}: image is {img.shape[:2]} but its mask is {label.shape}")
        scale = rng.choice(self.cfg.scales)
        img, label = augment.rescale(img, scale), augment.rescale(label, scale, nearest=True)
        x, label = augment.crop((augment.normalize(img), label), self.cfg.crop_size, (0.0, IGNORE_INDEX), rng)
        if self.cfg.hflip:
            x, label = augment.random_lr_flip((x, label), rng)
        return {"img": augment.to_chw(x), "label": torch.from_numpy(label.astype(np.int64))}


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Labels [B, H, W] to ``size`` by PIL nearest, as deeplab-pytorch's ``resize_labels`` (it notes
    that F.interpolate's nearest misaligns them)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return torch.stack([torch.from_numpy(np.array(augment.resize(lb.numpy().astype(np.uint8), size, nearest=True)))
                        for lb in labels]).long()


def segmentation_loss(outputs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Sum over the MSC outputs of the cross-entropy (main.py train), 255 ignored.

    Averaged over the valid pixels of the batch, and 0 rather than NaN when there are none.
    """
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for logits in outputs:
        target = resize_labels(labels, tuple(logits.shape[-2:])).to(logits.device)
        ce = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
        total = total + ce / (target != IGNORE_INDEX).sum().clamp_min(1)
    return total


# ----------------------------------------------------------------------------- distribution

def dist_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) as torchrun sets them; (1, 0, 0) in a plain process."""
    return int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))


@contextlib.contextmanager
def distributed(device: torch.device) -> Iterator[tuple[int, int]]:
    """Join torchrun's process group (env://) for the duration; yields (world size, rank).

    Re-entrant: a group that is already up is used and left up.
    """
    world = dist_env()[0]
    own = world > 1 and not dist.is_initialized()
    if own:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    try:
        yield (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    finally:
        if own:
            dist.destroy_process_group()


def rank_device(device: str | torch.device) -> torch.device:
    """Under torchrun each rank takes the CUDA device of its local rank."""
    device = torch.device(device)
    world, _, local_rank = dist_env()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _autocast(cfg: DeepLabTrainConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type != "cuda" or cfg.amp == "off":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)


# ----------------------------------------------------------------------------- training

def build_model(cfg: DeepLabTrainConfig, num_labels: int) -> DeepLab:
    """The configured network with its initial weights (``num_labels`` = classes + background)."""
    model = DeepLab(num_labels, cfg.model, cfg.arch, cfg.atrous_rates, cfg.msc_scales, cfg.freeze_bn)
    if cfg.init_weights:
        load_initial_weights(model, cfg.init_weights)
    return model


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step_*.pth"))


def _training_state(path: Path) -> dict[str, Any]:
    """A training state to resume from, read as tensors and plain data only: the file may have come
    from a shared output location, and unpickling arbitrary objects would run code."""
    try:
        state = read_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"refusing to resume from {path}: {e}; delete it or use another output") from e
    if not isinstance(state, dict) or not {"config", "model", "step"} <= set(state):
        raise CheckpointError(f"refusing to resume from {path}: it is not a training state of this program")
    return state


def train_deeplab(manifest: Manifest, out_dir: str | os.PathLike[str], cfg: DeepLabTrainConfig | None = None,
                  device: str | torch.device = "cpu", resume: bool = True, progress: bool = True,
                  on_checkpoint: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Train on the manifest's masks; writes ``out_dir/deeplab.pth`` and training states under
    ``out_dir/checkpoints/``. Under torchrun every rank calls this; rank 0 writes.

    Returns ``{"checkpoint", "steps", "world_size", "history"}``; ``history`` holds the mean loss of
    every ``log_every`` steps (over all ranks). ``on_checkpoint(path)`` is called (rank 0) after
    each training state is written, e.g. to upload it.
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
        steps_per_epoch = len(sampler) // per_rank
        if steps_per_epoch == 0:
            raise ValueError(f"{len(dataset)} images is fewer than one batch of {cfg.batch_size}")
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, len(manifest.classes) + 1).to(device)
        optimizer = PolySGD(model.param_groups(cfg.lr, cfg.weight_decay, cfg.head_lr_mult), max_step=cfg.iterations,
                            power=cfg.poly_power, momentum=cfg.momentum)
        scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp == "fp16")
        torch.manual_seed(cfg.seed + rank)  # each rank its own stream (dropout in DeepLabV3's head)
        step, history, window = 0, [], [0.0, 0]
        states = _checkpoints(out) if resume else []
        if states:
            state = _training_state(states[-1])
            changed = [k for k in RUN_FIELDS if state["config"].get(k) != getattr(cfg, k)]
            if changed:
                raise ValueError(f"{states[-1]} belongs to a run with other settings ({', '.join(changed)}); "
                                 "use another output folder or the same settings")
            if state["world_size"] != world:
                raise ValueError(f"{states[-1]} was written by {state['world_size']} processes, this run has {world}")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            _set_rng_state(state["rng"][rank], device)
            step, history, window = state["step"], state["history"], state["window"]
        net: torch.nn.Module = model
        if world > 1:
            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        net.train()
        bar = tqdm(total=cfg.iterations, initial=step, desc="train deeplab", unit="step",
                   disable=not progress or rank != 0)
        while step < cfg.iterations:
            epoch, offset = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch)
            dataset.epoch = epoch
            order = list(sampler)[offset * per_rank:steps_per_epoch * per_rank]
            # Its own generator: creating an iterator must not draw from the global RNG, which a
            # resumed run restores to the state at its checkpoint.
            loader = DataLoader(dataset, batch_size=per_rank, sampler=order, num_workers=cfg.num_workers,
                                drop_last=True, pin_memory=device.type == "cuda",
                                generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
            for batch in loader:
                with _autocast(cfg, device):
                    outputs = net(batch["img"].to(device, non_blocking=True))
                loss = segmentation_loss(outputs, batch["label"])
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                step += 1
                value = loss.detach()
                if world > 1:
                    dist.all_reduce(value)
                    value /= world
                window = [window[0] + value.item(), window[1] + 1]
                bar.update()
                bar.set_postfix(loss=f"{value.item():.4f}")
                if step % cfg.log_every == 0 or step == cfg.iterations:
                    history.append({"step": step, "loss": window[0] / window[1]})
                    window = [0.0, 0]
                if step % cfg.checkpoint_every == 0 or step == cfg.iterations:
                    _save_state(out, model, optimizer, scaler, step, history, window, cfg, world, device,
                                rank, on_checkpoint)
                if step == cfg.iterations:
                    break
        bar.close()
        final = out / "deeplab.pth"
        if rank == 0:
            save_deeplab(model, manifest.classes, final,
                         extra={"config": cfg.model_dump(mode="json"), "history": history, "steps": step,
                                "world_size": world})
        _barrier()
    return {"checkpoint": str(final), "steps": step, "world_size": world, "history": history}


def _save_state(out: Path, model: DeepLab, optimizer: PolySGD, scaler: torch.amp.GradScaler, step: int,
                history: list[dict[str, float]], window: list[float], cfg: DeepLabTrainConfig, world: int,
                device: torch.device, rank: int, on_checkpoint: Callable[[Path], None] | None) -> None:
    """Rank 0 writes the training state with every rank's RNG state; the oldest beyond
    ``keep_checkpoints`` are deleted."""
    rngs: list[Any] = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, _rng_state(device))
    else:
        rngs = [_rng_state(device)]
    if rank != 0:
        return
    path = out / "checkpoints" / f"step_{step:08d}.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "step": step, "history": history, "window": window, "rng": rngs, "world_size": world,
                     "config": cfg.model_dump(mode="json")}, path)
    for old in _checkpoints(out)[:-cfg.keep_checkpoints]:
        old.unlink()
    if on_checkpoint is not None:
        on_checkpoint(path)


# ----------------------------------------------------------------------------- inference

@torch.no_grad()
def predict_probs(model: DeepLab, image_uint8: np.ndarray, cfg: DeepLabTrainConfig | None = None,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """Class probabilities [K + 1, H, W] of one image: the fused (MSC) logits, upsampled bilinearly
    to the image (main.py test), softmax; averaged over ``test_scales`` and, if set, flips."""
    cfg = cfg or DeepLabTrainConfig()
    model.eval()
    size = image_uint8.shape[:2]
    total = None
    for batch in augment.multiscale_flip_batches(image_uint8, tuple(cfg.test_scales)):
        x = (batch if cfg.test_flip else batch[:1]).to(device)
        with _autocast(cfg, torch.device(device)):
            logits = model(x)[-1].float()
        probs = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).softmax(1)
        if cfg.test_flip:
            probs = torch.stack([probs[0], probs[1].flip(-1)])
        total = probs.sum(0) if total is None else total + probs.sum(0)
    return (total / (len(cfg.test_scales) * (2 if cfg.test_flip else 1))).cpu().numpy()


def predict_mask(model: DeepLab, image_uint8: np.ndarray, cfg: DeepLabTrainConfig | None = None,
                 device: str | torch.device = "cpu") -> np.ndarray:
    """Label map (0 background, i + 1 class i) of one image; dense CRF on the probabilities if
    ``use_crf``."""
    cfg = cfg or DeepLabTrainConfig()
    probs = predict_probs(model, image_uint8, cfg, device)
    if cfg.use_crf:
        return crf_probabilities(image_uint8, probs, cfg.crf).astype(np.uint8)
    return probs.argmax(0).astype(np.uint8)


def evaluate(model: DeepLab, manifest: Manifest, cfg: DeepLabTrainConfig | None = None,
             device: str | torch.device = "cpu", progress: bool = True) -> dict[str, Any]:
    """mIoU (with per-class IoU, precision, recall) on the manifest's ground-truth masks, with the
    all-background floor for comparison."""
    cfg = cfg or DeepLabTrainConfig()
    records = [r for r in manifest.records if r.mask is not None]
    if not records:
        raise ValueError("the manifest has no ground-truth masks to evaluate against")
    model.to(device)
    n_labels = len(manifest.classes) + 1
    floor = np.zeros((n_labels, n_labels), np.int64)  # confusion of predicting background everywhere

    def pairs() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        nonlocal floor
        for r in tqdm(records, desc="evaluate deeplab", unit="img", disable=not progress):
            gt = load_mask(manifest.mask_uri(r))
            floor += confusion(np.zeros_like(gt), gt, n_labels)
            yield predict_mask(model, load_image(manifest.image_uri(r)), cfg, device), gt

    report = evaluate_masks(pairs(), len(manifest.classes), manifest.classes)
    report["all_background_miou"] = scores(floor)["miou"]
    report["test_scales"], report["test_flip"], report["crf"] = cfg.test_scales, cfg.test_flip, cfg.use_crf
    return report


def predict_to(model: DeepLab, manifest: Manifest, storage: Storage, cfg: DeepLabTrainConfig | None = None,
               device: str | torch.device = "cpu", prefix: str = "masks", progress: bool = True,
               records: list[Any] | None = None) -> list[str]:
    """Write ``prefix/<id>.png`` (VOC palette, class indices) for each image; returns the keys."""
    cfg = cfg or DeepLabTrainConfig()
    model.to(device)
    keys = []
    for r in tqdm(manifest.records if records is None else records, desc="predict deeplab", unit="img",
                  disable=not progress):
        key = f"{prefix}/{r.id}.png"
        storage.put(key, label_png(predict_mask(model, load_image(manifest.image_uri(r)), cfg, device)), "image/png")
        keys.append(key)
    return keys


# ----------------------------------------------------------------------------- re-training (appendix A.1)

def fill_ignored(labels: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Second-round labels: the ignored (255) pixels take the first network's prediction."""
    if labels.shape != prediction.shape:
        raise ValueError(f"labels are {labels.shape} but the prediction is {prediction.shape}")
    return np.where(labels == IGNORE_INDEX, prediction, labels).astype(np.uint8)


def train_with_retraining(manifest: Manifest, out_dir: str | os.PathLike[str], cfg: DeepLabTrainConfig | None = None,
                          device: str | torch.device = "cpu", resume: bool = True, progress: bool = True,
                          on_checkpoint: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Appendix A.1's two rounds: train on the manifest's masks (255 = uncertain), fill their
    ignored pixels from that network's predictions, train again on the filled masks.

    Writes ``round1/``, ``filled/<id>.png`` with ``filled.jsonl``, ``round2/`` and ``deeplab.pth``
    (the second network). When no mask has an ignored pixel there is nothing to fill, and the
    first network is the result.
    """
    cfg = cfg or DeepLabTrainConfig()
    out = Path(out_dir)
    device = rank_device(device)
    with distributed(device) as (world, rank):
        first = train_deeplab(manifest, out / "round1", cfg, device, resume, progress, on_checkpoint)
        result: dict[str, Any] = {"rounds": [first]}
        todo = [r for r in manifest.records if (load_mask(manifest.mask_uri(r)) == IGNORE_INDEX).any()]
        result["filled_images"] = len(todo)
        if todo:
            model, _, _ = load_deeplab(first["checkpoint"])
            model.to(device)
            filled = LocalStorage(out / "filled")
            for r in tqdm(todo[rank::world], desc="fill ignored pixels", unit="img", disable=not progress or rank):
                label = load_mask(manifest.mask_uri(r))
                prediction = predict_mask(model, load_image(manifest.image_uri(r)), cfg, device)
                filled.put(f"{r.id}.png", label_png(fill_ignored(label, prediction)), "image/png")
            _barrier()
            todo_ids = {r.id for r in todo}
            second_manifest = Manifest(manifest.classes, [
                replace(r, image=manifest.image_uri(r), mask=filled.uri(f"{r.id}.png") if r.id in todo_ids
                        else manifest.mask_uri(r)) for r in manifest.records], str(out))
            if rank == 0:
                second_manifest.save(out / "filled.jsonl")
            second_cfg = cfg if cfg.retrain_init == "initial" else cfg.model_copy(
                update={"init_weights": first["checkpoint"]})
            result["rounds"].append(train_deeplab(second_manifest, out / "round2", second_cfg, device, resume,
                                                  progress, on_checkpoint))
        final = out / "deeplab.pth"
        if rank == 0:
            final.write_bytes(Path(result["rounds"][-1]["checkpoint"]).read_bytes())
        _barrier()
    last = result["rounds"][-1]
    return {**result, "checkpoint": str(final), "steps": last["steps"], "world_size": last["world_size"],
            "history": last["history"]}


# ----------------------------------------------------------------------------- jobs

def _work_dir(output: str, storage: Storage) -> Path:
    """Local folder for training: the output itself when local, else a fixed cache folder per
    output URI (the same on every rank and across restarts, so a run can resume)."""
    if isinstance(storage, LocalStorage):
        return storage.root
    digest = hashlib.sha256(output.encode()).hexdigest()[:16]
    return Path(os.environ.get("RIB_WORK_DIR", tempfile.gettempdir())) / "rib-deeplab" / digest


def run_training_job(spec: dict[str, Any]) -> dict[str, Any]:
    """An offline DeepLab job, as the training queue and ``rib deeplab`` send it.

    ``spec``: ``kind`` ("train" | "evaluate" | "predict"), ``manifest`` (path or s3:// URI),
    ``output`` (local folder or s3:// prefix), ``config`` (DeepLabTrainConfig overrides, ``preset``
    included), ``checkpoint`` (a DeepLab checkpoint; evaluate and predict), ``device`` (default cpu),
    ``progress`` (default false), and for train jobs ``evaluate_on`` (a manifest with ground truth:
    the trained network is then evaluated on it and its masks predicted, as one job). A train job
    with the same output resumes where it stopped. Returns a JSON-able summary; ``report.json``
    (evaluate), ``train_report.json`` (train) and ``predictions/<id>.png`` are written to the output.
    """
    kind = spec.get("kind")
    if kind not in ("train", "evaluate", "predict"):
        raise ValueError(f"kind must be train, evaluate or predict, not {kind!r}")
    for key in ("manifest", "output"):
        if not spec.get(key):
            raise ValueError(f"a {kind} job needs {key!r}")
    if kind != "train" and not spec.get("checkpoint"):
        raise ValueError(f"a {kind} job needs a 'checkpoint'")
    cfg = DeepLabTrainConfig(**spec.get("config", {}))
    device = rank_device(spec.get("device", "cpu"))
    progress = bool(spec.get("progress", False))
    storage = open_storage(spec["output"])
    manifest = load_manifest(spec["manifest"])
    _, rank, _ = dist_env()
    evaluate_on = load_manifest(spec["evaluate_on"]) if kind == "train" and spec.get("evaluate_on") else None
    if evaluate_on is not None and evaluate_on.classes != manifest.classes:
        raise ValueError(f"evaluate_on's classes {evaluate_on.classes} differ from the manifest's {manifest.classes}")
    if kind == "train":
        summary = _train_job(spec["output"], storage, manifest, cfg, device, progress, rank)
        if evaluate_on is None or rank != 0:
            return summary
        model, _, _ = load_deeplab(_work_dir(spec["output"], storage) / "deeplab.pth")
        evaluation = _evaluate_job(model, evaluate_on, storage, "evaluation/", cfg, device, progress)
        predictions = _predict_job(model, evaluate_on, storage, "evaluation/masks", cfg, device, progress)
        summary = {**summary, "evaluation": {**evaluation, **predictions}}
        storage.put("train_report.json", json.dumps(summary, indent=2).encode(), "application/json")
        return summary
    if rank != 0:  # inference runs in one process; other torchrun ranks have nothing to do
        return {"kind": kind, "rank": rank}
    model, classes, _ = load_deeplab(spec["checkpoint"])
    if classes != manifest.classes:
        raise ValueError(f"the checkpoint's classes {classes} differ from the manifest's {manifest.classes}")
    if kind == "evaluate":
        return {"kind": kind, **_evaluate_job(model, manifest, storage, "", cfg, device, progress)}
    return {"kind": kind, **_predict_job(model, manifest, storage, "masks", cfg, device, progress)}


def _evaluate_job(model: DeepLab, manifest: Manifest, storage: Storage, prefix: str, cfg: DeepLabTrainConfig,
                  device: torch.device, progress: bool) -> dict[str, Any]:
    report = evaluate(model, manifest, cfg, device, progress)
    storage.put(f"{prefix}report.json", json.dumps(report, indent=2).encode(), "application/json")
    return {"report": storage.uri(f"{prefix}report.json"), "miou": report["miou"],
            "all_background_miou": report["all_background_miou"], "images": report["images"]}


def _predict_job(model: DeepLab, manifest: Manifest, storage: Storage, prefix: str, cfg: DeepLabTrainConfig,
                 device: torch.device, progress: bool) -> dict[str, Any]:
    keys = predict_to(model, manifest, storage, cfg, device, prefix, progress)
    return {"predicted": len(keys), "masks": storage.uri(prefix)}


def _train_job(output: str, storage: Storage, manifest: Manifest, cfg: DeepLabTrainConfig, device: torch.device,
               progress: bool, rank: int) -> dict[str, Any]:
    work = _work_dir(output, storage)
    remote = not isinstance(storage, LocalStorage)
    upload: Callable[[Path], None] | None = None
    if remote:
        for key in storage.list(""):  # earlier training states of this output: resume from them
            if "checkpoints/" in key and not (work / key).exists():
                (work / key).parent.mkdir(parents=True, exist_ok=True)
                tmp = (work / key).with_name(f".{os.getpid()}.part")
                tmp.write_bytes(storage.get(key))
                os.replace(tmp, work / key)

        def upload(path: Path) -> None:
            """Send a new training state; drop the ones pruned locally."""
            storage.put(path.relative_to(work).as_posix(), path.read_bytes())
            folder = path.parent.relative_to(work).as_posix()
            for key in list(storage.list(folder + "/")):
                if not (work / key).exists():
                    storage.delete(key)

    train = train_with_retraining if cfg.retrain else train_deeplab
    result = train(manifest, work, cfg, device, True, progress, upload)
    summary = {"kind": "train", "checkpoint": storage.uri("deeplab.pth"), "world_size": result["world_size"],
               "rounds": len(result.get("rounds", [result])), "steps": result["steps"],
               "loss_first": result["history"][0]["loss"], "loss_last": result["history"][-1]["loss"],
               "history": result["history"]}
    if rank == 0:
        if remote:
            storage.put("deeplab.pth", (work / "deeplab.pth").read_bytes())
        storage.put("train_report.json", json.dumps(summary, indent=2).encode(), "application/json")
    return summary
