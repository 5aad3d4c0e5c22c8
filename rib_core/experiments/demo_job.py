"""The main job on the embedded default: demo data -> classifier -> CAM -> RIB -> refinement -> report.

Everything runs locally (files under one folder, no broker, no S3): it is the local form of a
pipeline job (``POST /v1/pipelines``), whose stage functions (:mod:`rib_core.jobs.stages`) it calls
on the same folder layout (``classifier/``, ``maps/``, ``refined/``), plus what only the demo has:
the generated data, single-digit pretraining in place of ImageNet weights, the CAM baseline and the
report. Each stage skips work whose output already exists, so an interrupted run resumes. The
sizes are chosen for 2 CPU cores; on the paper's data the same functions run with the paper's
defaults.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from rib_core.classifier.cam import CamConfig, LocalizationMap, run_cam
from rib_core.classifier.evaluate import evaluate_classifier
from rib_core.classifier.train import ClassifierTrainConfig, train_classifier
from rib_core.config.rib_config import RibConfig
from rib_core.config.stage_configs import (
    ConfidentLabelConfig,
    EvalConfig,
    IrnTrainConfig,
    RandomWalkConfig,
    RefineConfig,
    wide_thresholds,
)
from rib_core.data.datasets import Manifest, decode_mask, load_image, load_manifest, load_mask
from rib_core.data.demo_data import DemoDataConfig, make_demo_dataset
from rib_core.data.evaluation import all_background_miou, seed_from_map, sweep_folder
from rib_core.data.part_scenes import make_scenes
from rib_core.experiments.tune_config import SWEPT
from rib_core.io.report import write_html_report
from rib_core.io.visualize import label_png, map_overlay, png_bytes
from rib_core.jobs.stages import classifier_stage, maps_stage, refine_stage
from rib_core.refine.pseudo_masks import MaskScorer
from rib_core.runtime.provenance import run_record
from rib_core.training.checkpoints import load_classifier

# The canvas (docs/RESULTS.md notes, "Why 96 px scenes"): at output stride 16 a 96 px scene is a 6x6 CAM in which a
# 30-46 px digit covers 2-3 cells, and IRN's stride-4 walk gets a 24x24 map in which a digit's
# thickened strokes (4-7 px) are one to two cells wide; a 64 px scene gave a 4x4 CAM and strokes narrower
# than one walk cell. Larger canvases cost RIB (per image) and the classifier (per epoch) about
# the square of the side, which 2 CPU cores do not have in the demo's 10 minutes.
DEMO_CANVAS = 96


def canvas_rib(canvas: int = DEMO_CANVAS) -> RibConfig:
    """Paper settings except the sizes, which follow the canvas (crop 512 with resize-long 320-640 on
    ~500 px VOC images becomes the canvas with 0.75-1.25 of it: 96 with 72-120 for the demo), and 8
    companions instead of 20 for 2 CPU cores."""
    return RibConfig(crop_size=canvas, resize_long=(round(0.75 * canvas), round(1.25 * canvas)), companions=8)


# The scene recipe's length at 96 px: 3 epochs fixed, or at most PLATEAU_EPOCHS under the validation
# rule (stop="plateau"), whose maximum keeps the demo's classifier stage within its 10 minutes.
FIXED_EPOCHS, PLATEAU_EPOCHS = 3, 8


def scene_classifier(canvas: int, stop: Literal["fixed", "plateau"] = "fixed") -> ClassifierTrainConfig:
    """The from-scratch scene recipe for scenes of side ``canvas`` (docs/USAGE.md "The classifier").

    Crops and resize-long follow the canvas (80 px crops of the scene resized to a long side of
    72-120 px at 96 px: the scale the classifier is used at); epochs (the most epochs with
    ``stop="plateau"``) keep the pixel budget of :data:`FIXED_EPOCHS` or :data:`PLATEAU_EPOCHS`
    at 96 px (an epoch costs about the square of the side), and never fall below it.
    """
    ratio = canvas / DEMO_CANVAS
    base = FIXED_EPOCHS if stop == "fixed" else PLATEAU_EPOCHS
    return ClassifierTrainConfig(recipe="scratch", stop=stop, epochs=max(base, math.ceil(round(base / ratio**2, 6))),
                                 crop_size=round(80 * ratio), resize_long=(round(72 * ratio), round(120 * ratio)))


# What rib tune chose by the final pseudo-mask on the demo's training scenes 24-47, which the demo
# does not score (docs/results/tune_demo.json, benchmarks/tune_scenes.py; tests/test_tune.py holds
# these to that record): RIB's step by the first_step rule at gain 0.3 (the paper's fixed 8e-6
# hardly moves this classifier: docs/RESULTS.md, "RIB's step size across classifier recipes"),
# confident labels 0.7 / 0.5 (RIB's 0.35 / 0.17 left 35% of pixels unlabelled at that step), and a
# walk of 2^3 steps with background score 0.70 whose mask goes through the dense CRF (walk.crf). On
# the 24 scenes the demo scores this was IRN 84.3 against seed + CRF 73.1, where the starting
# settings gave 70.6 / 72.7.
TUNED_RIB: dict[str, Any] = {"lr_rule": "first_step", "step_gain": 0.3}
TUNED_LABELS: dict[str, float] = {"fg_threshold": 0.7, "bg_threshold": 0.5}
TUNED_WALK = (3, 0.70, True)  # 2^k steps, background score, CRF after the walk


def starting_refine() -> RefineConfig:
    """The demo's refinement before rib tune's choice: RIB's confident labels (0.35 / 0.17) and the
    walk at 2^4 steps, background 0.70 (re-training labels around it as the paper's around 0.27).
    IRN trains for 100 epochs (300 steps on the 24 images): IRN's 3 epochs are ~990 steps on VOC's
    10,582 images but 9 on 24, after which its boundaries carry nothing (docs/RESULTS.md notes, "IRN
    and the walk"). The seed sweep is wide (0.05-0.90, not VOC's 0.20-0.49): with the VOC sweep the
    demo's best threshold sat at its upper edge (0.49), so the sweep, not the maps, set the seed score."""
    return RefineConfig(irn=IrnTrainConfig(arch="resnet18", crop_size=DEMO_CANVAS, batch_size=8, epochs=100, radius=5),
                        walk=RandomWalkConfig().tuned(exp_times=4, bg_threshold=0.70),
                        evaluation=EvalConfig(thresholds=wide_thresholds()))


class DemoJobConfig(BaseModel):
    """The demo run: sizes chosen for 2 CPU cores, and the RIB step, confident labels and walk that
    rib tune chose on scenes the demo does not score (``TUNED_*``; :func:`starting_job` is the demo
    before that choice)."""

    model_config = ConfigDict(extra="forbid")

    data: DemoDataConfig = Field(default_factory=lambda: DemoDataConfig(
        n_train=1500, n_val=100, canvas=DEMO_CANVAS, digit_size=(30, 46), max_per_image=3))
    # No ImageNet weights here: single-digit pretraining stands in for them (docs/USAGE.md "The classifier").
    pretrain: ClassifierTrainConfig | None = Field(default_factory=lambda: ClassifierTrainConfig(
        recipe="scratch", batch_size=16, epochs=3, crop_size=48, resize_long=(44, 52)))
    pretrain_images: int = Field(4000, ge=1, description="single-digit images for the pretraining")
    # The scene training's length by its validation curve (at most 8 epochs): chosen over the fixed 3
    # epochs on the tuning seed 100 only (docs/RESULTS.md, benchmarks/bench_classifier_length.py).
    classifier: ClassifierTrainConfig = Field(default_factory=lambda: scene_classifier(DEMO_CANVAS, stop="plateau"))
    cam: CamConfig = Field(default_factory=CamConfig)
    rib: RibConfig = Field(default_factory=lambda: canvas_rib().model_copy(update=TUNED_RIB))
    # IRN's length and the seed sweep: starting_refine.
    # RIB's step, the confident labels and the walk are rib tune's choice (TUNED_RIB, TUNED_LABELS, TUNED_WALK).
    refine: RefineConfig = Field(default_factory=lambda: starting_refine().model_copy(update={
        "labels": ConfidentLabelConfig(**TUNED_LABELS), "walk": RandomWalkConfig().tuned(*TUNED_WALK)}))
    n_images: int = Field(24, ge=1, description="train images that get RIB maps and pseudo-masks (paper: all)")
    report_rows: int = Field(12, ge=0)


def starting_job(**fields: Any) -> DemoJobConfig:
    """The demo's job before rib tune's choice (``fields`` set the rest): the paper's RIB step (lr
    8e-6) and :func:`starting_refine`. The starting point of ``benchmarks.tune_scenes`` and the
    settings of the studies and benchmarks "at the paper's settings"."""
    return DemoJobConfig(rib=canvas_rib(), refine=starting_refine(), **fields)


def tuned_job(job: DemoJobConfig, record: dict[str, Any]) -> DemoJobConfig:
    """``job`` at what ``rib tune`` chose in ``record`` (a ``benchmarks.tune_scenes --record`` file):
    RIB's swept fields, the confident labels, and the walk (with or without the CRF after it)."""
    chosen = next(row for row in record["rib_sweep"] if row["setting"] == record["chosen"])
    rib = job.rib.model_copy(update={k: chosen[k] for k in SWEPT})
    labels = job.refine.labels.model_copy(update=record["labels"])
    walk = job.refine.walk.tuned(record["walk_exp_times"], record["walk_bg_threshold"], record["walk_crf"])
    return job.model_copy(update={"rib": rib, "refine": job.refine.model_copy(update={"labels": labels, "walk": walk})})


def fitted_job(job: DemoJobConfig, data: DemoDataConfig, stop: Literal["fixed", "plateau"] = "fixed",
               irn: bool = True) -> DemoJobConfig:
    """``job`` on other scenes (``data``): the scene classifier's recipe (:func:`scene_classifier`
    with ``stop``), RIB's sizes (those of :func:`canvas_rib`) and IRN's crop fitted to
    ``data.canvas``; ``irn`` False stops the refinement at seed + CRF."""
    refine = job.refine.model_copy(update={"use_irn": irn, "irn": job.refine.irn.model_copy(
        update={"crop_size": data.canvas})})
    sizes = canvas_rib(data.canvas)
    rib = job.rib.model_copy(update={"crop_size": sizes.crop_size, "resize_long": sizes.resize_long})
    return job.model_copy(update={"data": data, "classifier": scene_classifier(data.canvas, stop), "rib": rib,
                                  "refine": refine})


def scene_scale(cfg: ClassifierTrainConfig, canvas: int) -> float:
    """The mean scale at which scene training shows a scene: its mean resize-long over the canvas."""
    return sum(cfg.resize_long) / 2 / canvas


def single_digits(data: DemoDataConfig, cfg: ClassifierTrainConfig, images: int, scale: float) -> DemoDataConfig:
    """The pretraining data: ``images`` canvases of the pretraining crop, each with one digit drawn
    like the scenes' but scaled by ``scale`` (:func:`scene_scale` of the scene training), so that
    the digits look as large as in the scene crops; a digit larger than the crop is drawn at the
    crop's side (scenes of 60-100 px digits would otherwise ask for digits that fit no canvas)."""
    return data.model_copy(update={
        "n_train": images, "n_val": 100, "canvas": cfg.crop_size, "min_per_image": 1, "max_per_image": 1,
        "digit_size": tuple(min(cfg.crop_size, round(s * scale)) for s in data.digit_size)})


def digit_pretraining(out: Path, data: DemoDataConfig, cfg: ClassifierTrainConfig, images: int,
                      scale: float, device: str = "cpu", progress: bool = True) -> Path:
    """Pretrain on single digits of ``data``'s training half (:func:`single_digits`; the stand-in
    for ImageNet weights). Returns the classifier checkpoint to start from."""
    single = single_digits(data, cfg, images, scale)
    if not (out / "data" / "val.jsonl").exists():
        make_demo_dataset(out / "data", single)
    ckpt = out / "classifier.pth"
    if not ckpt.exists():
        train_classifier(load_manifest(out / "data" / "train.jsonl"), out, cfg, device=device, progress=progress,
                         val_manifest=out / "data" / "val.jsonl")
    return ckpt


def train_demo_classifier(out: Path, cfg: DemoJobConfig, train: Manifest, val_manifest: Path, device: str = "cpu",
                          progress: bool = True, seed: int | None = None) -> dict[str, Any]:
    """The demo's classifier stage: single-digit pretraining (if set), which stands in for the
    ImageNet weights a pipeline job gets as ``classifier.init_weights``, then the job's own
    classifier stage (:func:`classifier_stage`: scored on ``val_manifest`` every epoch, resumable).
    ``seed`` overrides both stages' seeds (``rib study``). Returns the stage's report; the
    checkpoint is ``out/classifier/classifier.pth`` (an existing one is kept)."""
    reseed = {} if seed is None else {"seed": seed}
    classifier_cfg = cfg.classifier.model_copy(update=reseed)
    if cfg.pretrain is not None and not (out / "classifier" / "classifier.pth").exists():
        start = digit_pretraining(out / "pretrain", cfg.data, cfg.pretrain.model_copy(update=reseed),
                                  cfg.pretrain_images, scene_scale(cfg.classifier, cfg.data.canvas), device, progress)
        classifier_cfg = classifier_cfg.model_copy(update={"init_weights": str(start)})
    return classifier_stage(out, train, classifier_cfg, val_manifest, device, progress=progress)


def stage_scores(out: Path, subset: Manifest, cfg: DemoJobConfig, refined: dict[str, Any],
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The demo's stage table (the all-background floor, CAM and RIB seeds at the best threshold of
    the sweep as the paper reports them, seed + CRF, IRN's confident labels, the IRN pseudo-mask),
    each with its per-class IoU, and the two seed sweeps."""
    cam_seed = sweep_folder(out / "cam", subset, cfg.refine.evaluation)
    rib_seed = sweep_folder(out / "maps", subset, cfg.refine.evaluation)
    floor = all_background_miou((load_mask(subset.mask_uri(r)) for r in subset.records), len(subset.classes))

    def row(method: str, s: dict[str, Any], detail: str) -> dict[str, Any]:
        return {"method": method, "miou": s["miou"], "precision": s["precision"], "recall": s["recall"],
                "f1": s["f1"], "iou": s["iou"], "detail": detail}

    # IRN's confident labels: scored by refine when it trains IRN; a run that resumed with IRN trained scores its files
    labels = refined.get("ir_labels") or _folder_scores(out / "refined" / "ir_labels", subset)
    irn = [row("IRN confident labels", labels, "what IRN trains on; 255 left out")] if labels else []
    return [
        {"method": "all background", "miou": floor, "detail": "the floor"},
        row("CAM seed", cam_seed["best"], f"best threshold {cam_seed['best_threshold']:.2f}"),
        row("RIB seed (M)", rib_seed["best"], f"best threshold {rib_seed['best_threshold']:.2f}"),
        row("RIB seed + CRF", refined["seeds_crf"], f"threshold {refined['seed_threshold']:.2f}"),
        *irn,
        row("RIB + IRN pseudo-mask", refined["masks"], "random walk on M" + (", then CRF" * cfg.refine.walk.crf)),
    ], {"cam_seed": cam_seed, "rib_seed": rib_seed}


def _folder_scores(folder: Path, subset: Manifest) -> dict[str, Any] | None:
    """Scores of the label maps ``folder/<id>.png`` against the truth (None without the folder)."""
    if not folder.is_dir():
        return None
    scorer = MaskScorer(list(subset.classes))
    for r in subset.records:
        scorer.add(load_mask(str(folder / f"{r.id}.png")), load_mask(subset.mask_uri(r)))
    return scorer.report()


REPORT_COLUMNS = ("input", "CAM", "RIB map M", "pseudo-mask", "ground truth")


def _miou(pred: np.ndarray, truth: np.ndarray, classes: list[str]) -> float:
    """One image's mIoU, pseudo-mask ignore pixels left out as in the stage table."""
    scorer = MaskScorer(classes)
    scorer.add(pred, truth)
    return scorer.report()["miou"]


def report_rows(out: Path, subset: Manifest, n: int, sweeps: dict[str, Any],
                ) -> tuple[list[dict[str, Any]], dict[str, dict[str, bytes]]]:
    """The first ``n`` images: per image its id, labels and mIoU of the CAM and M seeds (at each
    sweep's best threshold) and of the pseudo-mask (for report.json), and its pictures (input, CAM,
    M, pseudo-mask, ground truth: PNG bytes by column)."""
    rows, pictures = [], {}
    classes = list(subset.classes)
    for r in subset.records[:n]:
        image, truth = load_image(subset.image_uri(r)), load_mask(subset.mask_uri(r))
        cam, rib = LocalizationMap.load(out / "cam" / f"{r.id}.npz"), LocalizationMap.load(out / "maps" / f"{r.id}.npz")
        mask_png = (out / "refined" / "masks" / f"{r.id}.png").read_bytes()
        rows.append({"id": r.id, "labels": list(r.labels), "miou": {
            "CAM": _miou(seed_from_map(cam, sweeps["cam_seed"]["best_threshold"]), truth, classes),
            "RIB map M": _miou(seed_from_map(rib, sweeps["rib_seed"]["best_threshold"]), truth, classes),
            "pseudo-mask": _miou(decode_mask(mask_png), truth, classes)}})
        pictures[r.id] = {
            "input": png_bytes(image),
            "CAM": png_bytes(map_overlay(image, cam.high_res.max(0))),
            "RIB map M": png_bytes(map_overlay(image, rib.high_res.max(0))),
            "pseudo-mask": mask_png,
            "ground truth": label_png(truth),
        }
    return rows, pictures


def run_demo(out_dir: str | Path, cfg: DemoJobConfig | None = None, device: str = "cpu",
             progress: bool = True) -> dict[str, Any]:
    """Run every stage under ``out_dir``; returns the metrics and writes ``report.html``/``report.json``."""
    cfg = cfg or DemoJobConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = run_record(device)  # taken at the start: the code that ran, not what changed meanwhile
    timing: dict[str, float] = {}

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        timing[name] = round(time.perf_counter() - started, 1)

    data_dir = out / "data"
    with stage("data_s"):
        if not (data_dir / "val.jsonl").exists():
            make_scenes(data_dir, cfg.data)
        train = load_manifest(data_dir / "train.jsonl")
    with stage("classifier_s"):
        classifier = train_demo_classifier(out, cfg, train, data_dir / "val.jsonl", device, progress)
    ckpt = out / "classifier" / "classifier.pth"
    ids = [r.id for r in train.records[: cfg.n_images]]
    subset = train.subset(ids)
    with stage("cam_s"):  # the baseline that RIB is scored against; not a stage of the pipeline job
        run_cam(load_classifier(ckpt)[0], subset, out / "cam", cfg.cam, device, progress)
    with stage("rib_s"):  # the training scenes are the companion pool, as in a pipeline job
        maps_stage(out, train, ids, ckpt, cfg.rib, device, progress)
    with stage("refine_s"):
        # No ImageNet weights here: IRN's frozen backbone is the demo classifier's (irn_backbone's rule).
        refined = refine_stage(out, subset, ckpt, cfg.refine, device, progress=progress)

    metrics, sweeps = stage_scores(out, subset, cfg, refined)
    rows, pictures = report_rows(out, subset, cfg.report_rows, sweeps)
    # A classifier put in place (not trained here) recorded no validation: measure it for the report
    validation = classifier["validation"] or evaluate_classifier(load_classifier(ckpt)[0],
                                                                 load_manifest(data_dir / "val.jsonl"), device)
    quality = {k: v for k, v in classifier.items() if k not in ("history", "validation")}
    summary = {"run": run, "classifier": {**quality, "f1": validation.get("f1"), "map": validation.get("map"),
                                          "ap": validation.get("ap"), "f1_per_class": validation.get("f1_per_class")},
               "metrics": metrics, "timing": timing, "images": len(subset),
               **sweeps, "refine": refined, "rows": rows}
    (out / "report.json").write_text(json.dumps(summary, indent=2, default=float))
    write_html_report(out / "report.html", "RIB on MNIST scenes (demo)", json.loads((out / "report.json").read_text()),
                      subset.classes, REPORT_COLUMNS, pictures,
                      notes=[f"{len(subset)} training images; classifier trained from scratch (no ImageNet weights "
                             "here); a stage whose output already existed is skipped, so its time is the check's.",
                             "Seeds: the best background threshold of the sweep, as the paper reports them "
                             "(section 4.2.1), per image in the captions too. Pseudo-mask pixels of value 255 "
                             "(ignore) are left out of its scores."])
    return summary
