"""The paper's chain over one data set, stage by stage, on a local work folder.

classifier -> RIB maps -> refinement (confident labels, IRN, random walk) -> optionally DeepLab.
Each function is one stage of a pipeline job (``POST /v1/pipelines``): the worker copies the
stage's inputs into the work folder, calls it, and stores what it wrote. ``rib demo``
(:func:`rib_core.experiments.demo_job.run_demo`) is the local form of the same job: it calls these functions
on one folder. They call the same functions as ``rib rib`` / ``rib refine`` / ``rib deeplab`` with
the same settings objects, and each reuses what the folder already holds (a finished checkpoint, a
training state, maps), so a stage that ran before, or was killed half way, continues instead of
starting over.

The folder's layout (:data:`rib_core.io.artifacts.PIPELINE_LAYOUT` names it for the service)::

    classifier/classifier.pth, train_state.pth, train_report.json
    maps/<id>.npz
    refined/crf|ir_labels|masks|retrain_labels|overlays/<id>.png, irn.pth, irn_state.pth, report.json
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rib_core.classifier.evaluate import classifier_quality
from rib_core.classifier.train import train_classifier
from rib_core.config.network_configs import ClassifierTrainConfig, DeepLabTrainConfig
from rib_core.config.rib_config import RibConfig
from rib_core.config.stage_configs import RefineConfig
from rib_core.data.datasets import Manifest, median_long_side
from rib_core.deeplab.job import OnLog, run_training_job
from rib_core.io.storage import uri_version
from rib_core.refine.irn import load_irn
from rib_core.refine.pseudo_masks import refine_maps
from rib_core.rib.batching import run_rib
from rib_core.rib.companions import DEFAULT_CACHE_BYTES, POOLS
from rib_core.training.checkpoints import load_classifier, read_checkpoint
from rib_core.training.networks import CamNet

EpochHook = Callable[[int], None]  # called after each training epoch's state is saved; may raise to stop


def classifier_stage(work: Path, manifest: Manifest, cfg: ClassifierTrainConfig,
                     val_manifest: str | os.PathLike[str], device: str = "cpu",
                     after_epoch: EpochHook | None = None, name: str | None = None,
                     progress: bool = False) -> dict[str, Any]:
    """Train the classifier into ``work/classifier`` one epoch per call of :func:`train_classifier`
    (its ``stop_after_epoch``), resuming from ``train_state.pth``, with ``after_epoch`` between
    epochs; scored on ``val_manifest`` every epoch. Returns the validation report (mAP, F1, history),
    naming the checkpoint ``name`` (where it will be kept; default its path here)."""
    out = work / "classifier"
    final, state = out / "classifier.pth", out / "train_state.pth"
    while not final.exists():
        epoch = (int(read_checkpoint(state)["epoch"]) if state.exists() else 0) + 1
        train_classifier(manifest, out, cfg, device=device, resume=True, progress=progress, stop_after_epoch=epoch,
                         val_manifest=val_manifest)
        if after_epoch is not None:
            after_epoch(epoch)
    _, _, extra = load_classifier(final)
    return {**classifier_quality(extra, checkpoint=name or str(final)), "history": extra.get("history", []),
            "validation": extra.get("validation")}


_LONG_SIDES: dict[str, int] = {}  # manifest digest -> its images' median long side, read once per process


def long_side(manifest: Manifest) -> int:
    """:func:`median_long_side` of a data set, measured once per process (it reads image headers)."""
    if manifest.digest not in _LONG_SIDES:
        _LONG_SIDES[manifest.digest] = median_long_side(manifest)
    return _LONG_SIDES[manifest.digest]


class ClassifierCache:
    """The classifiers this process has loaded, by location and version (:func:`uri_version`: a
    rewritten file is loaded again), the last ``keep`` of them: every chunk of a job's maps stage
    shares one model (RIB fine-tunes copies of it) instead of reading a ResNet-50 from storage per
    chunk. ``loads`` counts real loads."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self.loads = 0
        self._models: dict[tuple[str, str, tuple[str, ...]], CamNet] = {}

    def get(self, uri: str | os.PathLike[str], classes: Sequence[str]) -> CamNet:
        key = (str(uri), uri_version(str(uri)), tuple(classes))
        if key not in self._models:
            self._models[key] = load_classifier(uri, classes)[0]
            self.loads += 1
            while len(self._models) > self.keep:
                del self._models[next(iter(self._models))]
        return self._models[key]


CLASSIFIERS = ClassifierCache()


def maps_stage(work: Path, manifest: Manifest, ids: Sequence[str], classifier: str | os.PathLike[str],
               cfg: RibConfig, device: str = "cpu", progress: bool = False, cache_bytes: int = DEFAULT_CACHE_BYTES,
               disk_cache: str | None = None) -> Path:
    """RIB maps of the images ``ids`` into ``work/maps`` (:func:`run_rib`, as ``rib rib`` and the
    demo): the data set itself is the companion pool, the process's one pool of it
    (:data:`~rib_core.rib.companions.POOLS`), so every chunk of a job reuses it, and the companion sizes
    not given follow its images (:meth:`RibConfig.fitted_to`, measured once per data set). Existing
    maps are kept. The classifier is loaded once per process too (:data:`CLASSIFIERS`)."""
    model = CLASSIFIERS.get(classifier, manifest.classes)
    pool = POOLS.get(manifest, cache_bytes=cache_bytes, disk_cache=disk_cache)
    cfg, _ = cfg.fitted_to(long_side(manifest))
    return run_rib(model, manifest.subset(ids), pool, work / "maps", cfg, device, progress=progress)


def refine_stage(work: Path, manifest: Manifest, classifier: str | os.PathLike[str], cfg: RefineConfig,
                 device: str = "cpu", after_epoch: EpochHook | None = None, progress: bool = False,
                 ) -> dict[str, Any]:
    """:func:`refine_maps` on ``work/maps`` into ``work/refined`` (as ``rib refine`` and the demo):
    IRN's training resumes from ``irn_state.pth`` (``after_epoch`` runs after each of its epochs),
    and a finished ``irn.pth`` is used as it is. The report adds IRN's loss per epoch."""
    out = work / "refined"
    trained = out / "irn.pth"
    report = refine_maps(work / "maps", manifest, out, cfg, str(trained) if trained.exists() else None,
                         device=device, progress=progress, classifier=str(classifier), irn_after_epoch=after_epoch)
    if cfg.use_irn:
        extra = load_irn(trained)[1]
        report["irn"] = {"history": extra.get("history", []), "steps": extra.get("steps"),
                         "resumed_from_epoch": extra.get("resumed_from_epoch", 0)}
    return report


def deeplab_stage(pseudo_masks: str, output: str, cfg: DeepLabTrainConfig, evaluate_on: str | None,
                  device: str = "cpu", on_log: OnLog | None = None) -> dict[str, Any]:
    """DeepLab trained on the pseudo-masks' manifest, as ``rib deeplab train`` (``output`` a local
    folder or s3:// prefix; its training state there is resumed), then evaluated on and predicting
    ``evaluate_on`` (a manifest with ground truth) when given. ``on_log`` sees each logged step."""
    spec: dict[str, Any] = {"kind": "train", "manifest": pseudo_masks, "output": output, "device": device,
                            "config": cfg.model_dump(mode="json")}
    if evaluate_on is not None:
        spec["evaluate_on"] = evaluate_on
    return run_training_job(spec, on_log)
