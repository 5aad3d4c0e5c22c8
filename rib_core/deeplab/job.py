"""Offline DeepLab jobs, as the training queue and ``rib deeplab`` send them: train on pseudo-masks
(with appendix A.1's re-training), evaluate, predict; with the training states synchronised to the
job's output when that is remote, so a restarted job resumes.

The pieces live by concern: settings and presets in :mod:`rib_core.config.stage_configs`, data and loss
in :mod:`rib_core.deeplab.data`, the training loop in :mod:`rib_core.deeplab.training` (on
:mod:`rib_core.training.loop`), test time in :mod:`rib_core.deeplab.inference`; the names callers have
always imported from here still are.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rib_core.config.network_configs import DeepLabTrainConfig
from rib_core.data.datasets import Manifest, load_manifest
from rib_core.deeplab.data import segmentation_loss
from rib_core.deeplab.inference import evaluate, predict_to
from rib_core.deeplab.model import DeepLab, load_deeplab
from rib_core.deeplab.training import OnLog, fill_ignored, train_deeplab, train_with_retraining
from rib_core.io.storage import LocalStorage, Storage, open_storage
from rib_core.training.loop import dist_env, rank_device

# The names callers and tests have always imported from here.
__all__ = ["DeepLabTrainConfig", "evaluate", "fill_ignored", "run_training_job", "segmentation_loss",
           "train_deeplab", "train_with_retraining"]

JOB_KINDS = ("train", "evaluate", "predict")


def _work_dir(output: str, storage: Storage) -> Path:
    """Local folder for training: the output itself when local, else a fixed cache folder per
    output URI (the same on every rank and across restarts, so a run can resume)."""
    if isinstance(storage, LocalStorage):
        return storage.root
    digest = hashlib.sha256(output.encode()).hexdigest()[:16]
    return Path(os.environ.get("RIB_WORK_DIR", tempfile.gettempdir())) / "rib-deeplab" / digest


def _check_spec(spec: dict[str, Any]) -> str:
    """The job's kind, once the spec has what that kind needs."""
    kind = spec.get("kind")
    if kind not in JOB_KINDS:
        raise ValueError(f"kind must be train, evaluate or predict, not {kind!r}")
    for key in ("manifest", "output"):
        if not spec.get(key):
            raise ValueError(f"a {kind} job needs {key!r}")
    if kind != "train" and not spec.get("checkpoint"):
        raise ValueError(f"a {kind} job needs a 'checkpoint'")
    return kind


def run_training_job(spec: dict[str, Any], on_log: OnLog | None = None) -> dict[str, Any]:
    """An offline DeepLab job, as the training queue and ``rib deeplab`` send it.

    ``spec``: ``kind`` ("train" | "evaluate" | "predict"), ``manifest`` (path or s3:// URI),
    ``output`` (local folder or s3:// prefix), ``config`` (DeepLabTrainConfig overrides, ``preset``
    included), ``checkpoint`` (a DeepLab checkpoint; evaluate and predict), ``device`` (default cpu),
    ``progress`` (default false), and for train jobs ``evaluate_on`` (a manifest with ground truth:
    the trained network is then evaluated on it and its masks predicted, as one job). A train job
    with the same output resumes where it stopped; ``on_log`` sees each logged training step
    (:func:`rib_core.deeplab.training.train_deeplab`'s). Returns a JSON-able summary; ``report.json``
    (evaluate), ``train_report.json`` (train) and ``predictions/<id>.png`` are written to the output.
    """
    kind = _check_spec(spec)
    cfg = DeepLabTrainConfig(**spec.get("config", {}))
    device = rank_device(spec.get("device", "cpu"))
    progress = bool(spec.get("progress", False))
    storage = open_storage(spec["output"])
    manifest = load_manifest(spec["manifest"])
    _, rank, _ = dist_env()
    if kind == "train":
        return _train_and_evaluate(spec, storage, manifest, cfg, device, progress, rank, on_log)
    if rank != 0:  # inference runs in one process; other torchrun ranks have nothing to do
        return {"kind": kind, "rank": rank}
    model, classes, _ = load_deeplab(spec["checkpoint"])
    if classes != manifest.classes:
        raise ValueError(f"the checkpoint's classes {classes} differ from the manifest's {manifest.classes}")
    if kind == "evaluate":
        return {"kind": kind, **_evaluate_job(model, manifest, storage, "", cfg, device, progress)}
    return {"kind": kind, **_predict_job(model, manifest, storage, "masks", cfg, device, progress)}


def _train_and_evaluate(spec: dict[str, Any], storage: Storage, manifest: Manifest, cfg: DeepLabTrainConfig,
                        device: torch.device, progress: bool, rank: int, on_log: OnLog | None) -> dict[str, Any]:
    """A train job; with ``evaluate_on``, rank 0 then scores the network on it and predicts its masks."""
    evaluate_on = load_manifest(spec["evaluate_on"]) if spec.get("evaluate_on") else None
    if evaluate_on is not None and evaluate_on.classes != manifest.classes:
        raise ValueError(f"evaluate_on's classes {evaluate_on.classes} differ from the manifest's {manifest.classes}")
    summary = _train_job(spec["output"], storage, manifest, cfg, device, progress, rank, on_log)
    if evaluate_on is None or rank != 0:
        return summary
    model, _, _ = load_deeplab(_work_dir(spec["output"], storage) / "deeplab.pth")
    evaluation = _evaluate_job(model, evaluate_on, storage, "evaluation/", cfg, device, progress)
    predictions = _predict_job(model, evaluate_on, storage, "evaluation/masks", cfg, device, progress)
    summary = {**summary, "evaluation": {**evaluation, **predictions}}
    storage.put("train_report.json", json.dumps(summary, indent=2).encode(), "application/json")
    return summary


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


# ----------------------------------------------------------------------------- training states in remote storage

def _download_states(storage: Storage, work: Path) -> None:
    """Earlier training states of this output, copied into the work folder to resume from."""
    for key in storage.list(""):
        if "checkpoints/" in key and not (work / key).exists():
            (work / key).parent.mkdir(parents=True, exist_ok=True)
            tmp = (work / key).with_name(f".{os.getpid()}.part")
            tmp.write_bytes(storage.get(key))
            os.replace(tmp, work / key)


def _uploader(storage: Storage, work: Path) -> Callable[[Path], None]:
    def upload(path: Path) -> None:
        """Send a new training state; drop the ones pruned locally."""
        storage.put(path.relative_to(work).as_posix(), path.read_bytes())
        folder = path.parent.relative_to(work).as_posix()
        for key in list(storage.list(folder + "/")):
            if not (work / key).exists():
                storage.delete(key)

    return upload


def _train_job(output: str, storage: Storage, manifest: Manifest, cfg: DeepLabTrainConfig, device: torch.device,
               progress: bool, rank: int, on_log: OnLog | None) -> dict[str, Any]:
    work = _work_dir(output, storage)
    remote = not isinstance(storage, LocalStorage)
    upload: Callable[[Path], None] | None = None
    if remote:
        _download_states(storage, work)
        upload = _uploader(storage, work)
    train = train_with_retraining if cfg.retrain else train_deeplab
    result = train(manifest, work, cfg, device, True, progress, upload, on_log)
    summary = {"kind": "train", "checkpoint": storage.uri("deeplab.pth"), "world_size": result["world_size"],
               "rounds": len(result.get("rounds", [result])), "steps": result["steps"],
               "loss_first": result["history"][0]["loss"], "loss_last": result["history"][-1]["loss"],
               "history": result["history"]}
    if rank == 0:
        if remote:
            storage.put("deeplab.pth", (work / "deeplab.pth").read_bytes())
        storage.put("train_report.json", json.dumps(summary, indent=2).encode(), "application/json")
    return summary
