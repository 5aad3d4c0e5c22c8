"""From localization maps to pseudo-masks: seed + CRF, and IRN (the paper's refinement, section 3.3).

The IRN pipeline as the RIB code runs it (``run_sample.py``), one module per step:

1. confident labels (:mod:`rib_core.refine.confident_labels`, ``step/cam_to_ir_label.py``);
2. IRN trained on them (:mod:`rib_core.refine.irn_training`, ``step/train_irn.py``);
3. random walk (:mod:`rib_core.refine.random_walk`, ``step/make_sem_seg_labels.py``).

Optionally, saliency maps veto pixels where they disagree with the mask (:mod:`rib_core.refine.saliency`,
the paper's RIB-Sal). Seed + CRF is this project's baseline and the path without IRN. Here: the
settings of all of it, the per-image work (:func:`refine_one`) and the folder driver
(:func:`refine_maps`) that trains IRN and scores every step against ground truth.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rib_core.classifier.cam import LocalizationMap
from rib_core.config.stage_configs import CrfConfig, RefineConfig
from rib_core.data.classes import IGNORE_INDEX
from rib_core.data.datasets import Manifest, ManifestRecord, load_image, load_manifest, load_mask
from rib_core.data.evaluation import confusion, scores, seed_from_map, sweep_seeds, write_report
from rib_core.io.storage import join_uri, read_bytes, uri_exists
from rib_core.io.visualize import label_png, mask_overlay, png_bytes
from rib_core.refine.confident_labels import confident_labels
from rib_core.refine.crf import crf_mask, crf_seed
from rib_core.refine.irn import IrnNet, boundary_map, load_irn
from rib_core.refine.irn_training import irn_backbone, train_irn
from rib_core.refine.random_walk import mask_from_scores, three_way_labels, walk_scores
from rib_core.refine.saliency import apply_saliency, decode_saliency
from rib_core.runtime.progress import ImageProgress


def walk_mask(image_uint8: np.ndarray, walked: np.ndarray, keys: Sequence[int], bg_threshold: float,
              crf: CrfConfig | None = None) -> np.ndarray:
    """IRN's mask from the walk's values (:func:`mask_from_scores`), refined by a dense CRF on the
    image when ``crf`` is given (``walk.crf``)."""
    mask = mask_from_scores(walked, keys, bg_threshold)
    return mask if crf is None else crf_mask(image_uint8, mask, keys, crf)


def refine_one(image_uint8: np.ndarray, lmap: LocalizationMap, irn_model: IrnNet | None,
               cfg: RefineConfig | None = None, saliency: np.ndarray | None = None,
               device: torch.device | str = "cpu", retrain_labels: bool = False) -> dict[str, np.ndarray]:
    """The per-image work: ``seed``, ``crf`` (seed + CRF), ``irn`` (when a model is given; the walk's
    mask, through a CRF too with ``walk.crf``) and
    ``mask``, the final pseudo-mask (IRN's, else the CRF's; saliency applied if given). With
    ``retrain_labels`` and a model, also ``retrain``: the walk's three-way labels for DeepLab's
    re-training (appendix A.1)."""
    cfg = cfg or RefineConfig()
    out = {"seed": seed_from_map(lmap, cfg.seed_threshold),
           "crf": crf_seed(image_uint8, lmap, cfg.seed_threshold, cfg.crf)}
    if irn_model is not None:
        walked = walk_scores(lmap, boundary_map(irn_model, image_uint8, device), cfg.walk)
        out["irn"] = walk_mask(image_uint8, walked, lmap.keys, cfg.walk.bg_threshold, cfg.crf if cfg.walk.crf else None)
        if retrain_labels:
            out["retrain"] = three_way_labels(walked, lmap.keys, cfg.walk.retrain_fg_threshold,
                                              cfg.walk.retrain_bg_threshold)
    mask = out.get("irn", out["crf"])
    out["mask"] = mask if saliency is None else apply_saliency(mask, saliency, cfg.saliency_threshold)
    return out


class MaskScorer:
    """Confusion over a set; predicted 255 (ignored pixels of a pseudo-mask) is left out and counted."""

    def __init__(self, classes: list[str]) -> None:
        self.conf = np.zeros((len(classes) + 1,) * 2, np.int64)
        self.classes = classes
        self.images = 0
        self.ignored = 0
        self.total = 0

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        ignored = pred == IGNORE_INDEX
        valid_gt = gt != IGNORE_INDEX
        self.images += 1
        self.ignored += int((ignored & valid_gt).sum())
        self.total += int(valid_gt.sum())
        self.conf += confusion(np.where(ignored, 0, pred), np.where(ignored, IGNORE_INDEX, gt), len(self.conf))

    def report(self) -> dict[str, Any]:
        return {"images": self.images, **scores(self.conf, self.classes),
                "ignored_fraction": self.ignored / max(self.total, 1)}


@dataclass
class _FolderRun:
    """The inputs of one :func:`refine_maps` call: images with maps, their ground truth, saliency."""

    manifest: Manifest
    records: list[ManifestRecord]
    missing: list[str]
    maps: Path
    out: Path
    saliency: dict[str, str]
    progress: bool

    @classmethod
    def gather(cls, maps_dir: str | os.PathLike[str], manifest: Manifest, out_dir: str | os.PathLike[str],
               saliency_dir: str | None, progress: bool) -> _FolderRun:
        """The manifest's images that have a map; refuses no maps or missing saliency maps."""
        maps = Path(maps_dir)
        records = [r for r in manifest.records if (maps / f"{r.id}.npz").exists()]
        if not records:
            raise FileNotFoundError(f"no map <id>.npz in {maps} for any of the {len(manifest)} images of the manifest")
        saliency = {} if saliency_dir is None else {r.id: join_uri(saliency_dir, f"{r.id}.png") for r in records}
        absent = [u for u in saliency.values() if not uri_exists(u)]
        if absent:
            raise FileNotFoundError(f"{len(absent)} saliency map(s) missing, e.g. {absent[:3]}")
        missing = [r.id for r in manifest.records if not (maps / f"{r.id}.npz").exists()]
        return cls(manifest, records, missing, maps, Path(out_dir), saliency, progress)

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes)

    def lmap(self, r: ManifestRecord) -> LocalizationMap:
        return LocalizationMap.load(self.maps / f"{r.id}.npz")

    def truth(self) -> dict[str, str]:
        """Ground-truth mask URIs of the images that have one."""
        return {r.id: self.manifest.mask_uri(r) for r in self.records if r.mask is not None}

    def images(self, desc: str) -> Iterator[tuple[ManifestRecord, np.ndarray, LocalizationMap]]:
        for r in ImageProgress(self.records, desc=desc, disable=not self.progress):
            yield r, load_image(self.manifest.image_uri(r)), self.lmap(r)

    def write(self, folder: str, image_id: str, data: bytes) -> None:
        (self.out / folder).mkdir(parents=True, exist_ok=True)
        (self.out / folder / f"{image_id}.png").write_bytes(data)

    def mask_manifest(self, folder: str) -> str:
        """``<folder>.jsonl``: the images with ``out/<folder>/<id>.png`` as their masks, for DeepLab."""
        path = self.out / f"{folder}.jsonl"
        Manifest(self.manifest.classes, [replace(r, image=self.manifest.image_uri(r), mask=f"{folder}/{r.id}.png")
                                         for r in self.records], str(self.out)).save(path)
        return str(path)


def _seed_threshold(run: _FolderRun, cfg: RefineConfig, report: dict[str, Any]) -> float:
    """The seed sweep over the images with ground truth; its best threshold unless told otherwise."""
    gts = run.truth()
    if not gts:
        return cfg.seed_threshold
    pairs = ((run.lmap(r), load_mask(gts[r.id])) for r in run.records if r.id in gts)
    report["seeds"] = sweep_seeds(pairs, len(run.classes), cfg.evaluation, run.classes)
    return report["seeds"]["best_threshold"] if cfg.threshold_from_sweep else cfg.seed_threshold


def _train_irn_here(run: _FolderRun, cfg: RefineConfig, backbone: str, device: torch.device | str,
                    report: dict[str, Any], after_epoch: Callable[[int], None] | None = None) -> str:
    """Confident labels of every image (``ir_labels/``, scored), then IRN trained on them."""
    gts, scorer = run.truth(), MaskScorer(run.classes)
    label_cfg = cfg.labels.at_seed(cfg.seed_threshold)
    report["ir_label_thresholds"] = {"fg": label_cfg.fg_threshold, "bg": label_cfg.bg_threshold}
    for r, image, lmap in run.images("confident labels"):
        labels = confident_labels(image, lmap, label_cfg)
        run.write("ir_labels", r.id, label_png(labels))
        if r.id in gts:
            scorer.add(labels, load_mask(gts[r.id]))
    if gts:
        report["ir_labels"] = scorer.report()
    irn_cfg = cfg.irn.model_copy(update={"init_weights": backbone})
    return str(train_irn(run.manifest.subset([r.id for r in run.records]), run.out / "ir_labels", run.out,
                         irn_cfg, device, run.progress, after_epoch=after_epoch))


def _write_masks(run: _FolderRun, model: IrnNet | None, cfg: RefineConfig, device: torch.device | str,
                 report: dict[str, Any]) -> None:
    """:func:`refine_one` on every image: CRF, IRN and final masks, overlays, re-training labels, scores."""
    gts = run.truth()
    crf_score, mask_score, raw_score = (MaskScorer(run.classes) for _ in range(3))
    for r, image, lmap in run.images("masks"):
        saliency = decode_saliency(read_bytes(run.saliency[r.id])) if run.saliency else None
        out = refine_one(image, lmap, model, cfg, saliency, device, retrain_labels=True)
        run.write("crf", r.id, label_png(out["crf"]))
        if "retrain" in out:
            run.write("retrain_labels", r.id, label_png(out["retrain"]))
        run.write("masks", r.id, label_png(out["mask"]))
        run.write("overlays", r.id, png_bytes(mask_overlay(image, out["mask"])))
        if r.id in gts:
            gt = load_mask(gts[r.id])
            crf_score.add(out["crf"], gt)
            mask_score.add(out["mask"], gt)
            raw_score.add(out.get("irn", out["crf"]), gt)
    if gts:
        report["seeds_crf"], report["masks"] = crf_score.report(), mask_score.report()
        if run.saliency:
            report["masks_without_saliency"] = raw_score.report()


def refine_maps(maps_dir: str | os.PathLike[str], manifest: Manifest | str | os.PathLike[str],
                out_dir: str | os.PathLike[str], cfg: RefineConfig | None = None,
                irn_checkpoint: str | None = None, saliency_dir: str | None = None,
                device: torch.device | str = "cpu", progress: bool = True,
                classifier: str | os.PathLike[str] | None = None,
                irn_after_epoch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Maps folder (``<id>.npz``) + manifest -> pseudo-masks, overlays and a report.

    Writes under ``out_dir``: ``crf/<id>.png`` (seed + CRF), ``ir_labels/<id>.png`` and ``irn.pth``
    (when IRN is trained here), ``masks/<id>.png`` (final pseudo-masks, VOC palette, 255 ignore),
    ``retrain_labels/<id>.png`` (with IRN), ``overlays/<id>.png`` and ``report.json``. IRN is
    trained on the confident labels of every image unless ``irn_checkpoint`` (path or s3:// URI) is
    given; its frozen backbone is ``cfg.irn.init_weights``, else the ``classifier`` checkpoint's,
    and with neither this refuses (ValueError) before any work. Images with ground truth are
    scored: seeds (threshold sweep), seeds + CRF, confident labels and masks. IRN's training
    resumes from ``out_dir/irn_state.pth`` when one of the same settings is there; ``irn_after_epoch(epoch)`` runs after
    each of its epochs (:func:`~rib_core.refine.irn_training.train_irn`).
    """
    cfg = cfg or RefineConfig()
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    run = _FolderRun.gather(maps_dir, manifest, out_dir, saliency_dir, progress)
    train_here = cfg.use_irn and irn_checkpoint is None
    backbone = irn_backbone(cfg.irn, classifier) if train_here else None
    report: dict[str, Any] = {"images": len(run.records), "missing_maps": len(run.missing),
                              "missing_ids": run.missing[:20], "evaluated_images": len(run.truth())}
    timing: dict[str, float] = {}
    started = time.perf_counter()
    used = cfg.model_copy(update={"seed_threshold": _seed_threshold(run, cfg, report)})
    report["seed_threshold"] = used.seed_threshold
    timing["seed_sweep_s"] = time.perf_counter() - started
    model: IrnNet | None = None
    if cfg.use_irn:
        started = time.perf_counter()
        if backbone is not None:
            irn_checkpoint = _train_irn_here(run, used, backbone, device, report, irn_after_epoch)
            report["irn_backbone"] = backbone
        model = load_irn(irn_checkpoint)[0].to(device)
        report["irn_checkpoint"] = irn_checkpoint
        timing["labels_and_irn_train_s" if train_here else "irn_load_s"] = time.perf_counter() - started
    started = time.perf_counter()
    _write_masks(run, model, used, device, report)
    timing["masks_s"] = time.perf_counter() - started
    report["manifests"] = {"pseudo_masks": run.mask_manifest("masks")}
    if model is not None:
        report["manifests"]["retrain_labels"] = run.mask_manifest("retrain_labels")
    report["timing"] = {k: round(v, 2) for k, v in timing.items()}
    report["config"] = cfg.model_dump()
    write_report(report, run.out / "report.json")
    return report
