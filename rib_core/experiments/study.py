"""Every stage's gain, over seeds (``rib study``): is each stage of the chain worth its cost here?

For each seed the whole chain runs on the same data: the classifier (trained with that seed; its
validation mAP), CAM, RIB-GAP and RIB-GNDRP (RIB with that seed), seed + CRF, IRN's confident
labels (and the share they leave unlabelled), IRN's pseudo-mask, and DeepLab trained on the
pseudo-masks and scored on the validation images. The fully supervised bound is DeepLab with the
same recipe and initial weights on the true masks of the same training images, for as many steps
as both rounds of the pseudo-label run (true masks have nothing to fill, so one round), scored
on the same validation images, so the table can show pseudo-label DeepLab as a fraction of it (the paper's
network reaches about 89% of full supervision on VOC).

Seeds are scored at the best threshold of the sweep, as the paper reports them (section 4.2.1):
that threshold is chosen on the scored images themselves, which the report says. Every other
setting is fixed before the run (the demo's), never chosen on the images scored here.

At size (``n_images`` a few hundred, issue 24 part 5) IRN and DeepLab learn from as many maps as
the study makes; ``held_out`` more training images get maps too and are refined by that IRN at
the seed threshold and with the walk chosen on the first ``n_images``, so their rows are scored on
images no stage was fitted or tuned on. ``parts`` runs the chain on the premise benchmark's scenes
(:mod:`rib_core.data.part_scenes`), with the job's sizes fitted to their canvas.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from rib_core.classifier.cam import run_cam
from rib_core.config.network_configs import DeepLabTrainConfig
from rib_core.config.stage_configs import RefineConfig
from rib_core.data.datasets import Manifest, load_manifest
from rib_core.data.evaluation import sweep_folder
from rib_core.data.part_scenes import PartSceneConfig, make_scenes
from rib_core.deeplab.inference import evaluate
from rib_core.deeplab.model import load_deeplab
from rib_core.deeplab.training import train_deeplab, train_with_retraining
from rib_core.experiments.demo_job import DemoJobConfig, fitted_job, starting_job, train_demo_classifier
from rib_core.experiments.tune import walk_curve
from rib_core.experiments.tune_config import walk_lengths, walk_thresholds
from rib_core.jobs.stages import maps_stage, refine_stage
from rib_core.refine.pseudo_masks import refine_maps
from rib_core.rib.batching import run_rib
from rib_core.rib.companions import CompanionPool
from rib_core.runtime.provenance import run_record
from rib_core.training.checkpoints import load_classifier

# Rows of the table: (key, label). Scores are mIoU except the classifier's mAP.
ROWS = (
    ("classifier_map", "classifier validation mAP"),
    ("cam_seed", "CAM seed"),
    ("rib_gap_seed", "RIB-GAP seed"),
    ("rib_gndrp_seed", "RIB-GNDRP seed"),
    ("seed_crf", "RIB-GNDRP seed + CRF"),
    ("confident_labels", "IRN confident labels"),
    ("unlabelled_share", "  share left unlabelled"),
    ("irn_mask", "IRN pseudo-mask"),
    ("seed_crf_held_out", "seed + CRF, held-out images"),
    ("irn_mask_held_out", "IRN pseudo-mask, held-out images"),
    ("deeplab_pseudo", "DeepLab on pseudo-masks (val)"),
    ("deeplab_full", "DeepLab on true masks (val)"),
)
# Paired differences (a - b), computed per seed, then averaged.
DIFFERENCES = (
    ("rib_gndrp_seed", "cam_seed"),
    ("rib_gap_seed", "cam_seed"),
    ("rib_gndrp_seed", "rib_gap_seed"),
    ("seed_crf", "rib_gndrp_seed"),
    ("irn_mask", "seed_crf"),
    ("irn_mask", "rib_gndrp_seed"),
    ("irn_mask_held_out", "seed_crf_held_out"),
    ("deeplab_pseudo", "irn_mask"),
)


def _small_deeplab() -> DeepLabTrainConfig:
    # The demo DeepLab command of docs/USAGE.md: ResNet-18, from the classifier's weights (see
    # StudyConfig.deeplab_from_classifier), batch norm trained, no multi-scale inputs.
    return DeepLabTrainConfig(arch="resnet18", batch_size=10, iterations=300, lr=2e-3, freeze_bn=False,
                              msc_scales=[])


class StudyConfig(BaseModel):
    """The chain's settings are the demo's before rib tune's choice (:func:`starting_job`: the paper's RIB
    step, RIB's confident labels); the study adds seeds and the DeepLab stage."""

    model_config = ConfigDict(extra="forbid")

    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    demo: DemoJobConfig = Field(default_factory=starting_job)
    # The premise benchmark's scenes (rib_core.data.part_scenes.PREMISE_SCENES for its recipe) in
    # place of demo.data; the classifier recipe (3 epochs, as bench_premise), RIB's sizes and IRN's
    # crop follow their canvas (demo_job.fitted_job).
    parts: PartSceneConfig | None = None
    held_out: int = Field(0, ge=0, description="training images after the first demo.n_images that get maps and "
                                               "are refined by the IRN trained on those, scored apart")
    use_gap: bool = Field(True, description="the RIB-GAP row (one more RIB run per image)")
    # The held-out rows' walk is chosen on the first images over rib tune's grid, as their seed threshold is.
    walk_exp_times: list[int] = Field(default_factory=walk_lengths, min_length=1,
                                      description="walk lengths (2^k steps) tried for the held-out rows")
    walk_thresholds: list[float] = Field(default_factory=walk_thresholds, min_length=1,
                                         description="walk background scores tried for the held-out rows")
    walk_crf: list[bool] = Field(default_factory=lambda: [False], min_length=1,
                                 description="the walk's mask without (false) / through (true) the dense CRF "
                                             "(walk.crf), tried for the held-out rows; [false]: IRN's code")
    deeplab: DeepLabTrainConfig = Field(default_factory=_small_deeplab)
    # The paper starts DeepLab from ImageNet weights; none exist here, so the seed's classifier
    # backbone stands in (as for IRN). False: random initial weights.
    deeplab_from_classifier: bool = True
    use_deeplab: bool = True  # False: stop at the pseudo-masks (no DeepLab rows)

    def job(self) -> DemoJobConfig:
        """The chain's settings: the demo's, or fitted to the part scenes."""
        return self.demo if self.parts is None else fitted_job(self.demo, self.parts)


def _seed_score(maps: Path, manifest: Manifest, demo: DemoJobConfig) -> float:
    return sweep_folder(maps, manifest, demo.refine.evaluation)["best"]["miou"]


def _deeplab_miou(train: Manifest, val: Manifest, out: Path, dl: DeepLabTrainConfig, device: str,
                  progress: bool) -> float:
    report_path = out / "evaluation.json"
    if not report_path.exists():
        trainer = train_with_retraining if dl.retrain else train_deeplab
        result = trainer(train, out, dl, device, True, progress)
        model, _, _ = load_deeplab(result["checkpoint"])
        report_path.write_text(json.dumps(evaluate(model, val, dl, device, progress), indent=2, default=float))
    return json.loads(report_path.read_text())["miou"]


def run_seed(seed: int, train: Manifest, val_path: Path, out: Path, cfg: StudyConfig, device: str,
             progress: bool) -> dict[str, float]:
    """The whole chain with one seed, as the demo runs it (the pipeline job's stages on one folder:
    ``classifier/``, ``maps/`` for RIB-GNDRP, ``refined/``), plus the CAM and RIB-GAP baselines, the
    held-out images' refinement and the two DeepLabs; each stage reuses what an earlier run left in ``out``."""
    demo = cfg.job()
    classifier = train_demo_classifier(out, demo, train, val_path, device, progress, seed)
    ckpt = out / "classifier" / "classifier.pth"
    model, _, _ = load_classifier(ckpt)
    row = {"classifier_map": classifier["val_map"]}
    ids = [r.id for r in train.records[: demo.n_images]]
    held_ids = [r.id for r in train.records[demo.n_images: demo.n_images + cfg.held_out]]
    subset = train.subset(ids)
    row["cam_seed"] = _seed_score(run_cam(model, subset, out / "cam", demo.cam, device, progress), subset, demo)
    gndrp = demo.rib.model_copy(update={"pooling": "gndrp", "seed": seed})
    if cfg.use_gap:
        gap_maps = run_rib(model, subset, CompanionPool.from_manifest(train), out / "rib_gap",
                           gndrp.model_copy(update={"pooling": "gap"}), device, progress)
        row["rib_gap_seed"] = _seed_score(gap_maps, subset, demo)
    maps = maps_stage(out, train, ids + held_ids, ckpt, gndrp, device, progress)
    row["rib_gndrp_seed"] = _seed_score(maps, subset, demo)
    refine_cfg = demo.refine.model_copy(update={"irn": demo.refine.irn.model_copy(update={"seed": seed})})
    refined = _saved_or(out / "refined", lambda: refine_stage(out, subset, ckpt, refine_cfg, device, progress=progress))
    row.update(seed_crf=refined["seeds_crf"]["miou"], confident_labels=refined["ir_labels"]["miou"],
               unlabelled_share=refined["ir_labels"]["ignored_fraction"], irn_mask=refined["masks"]["miou"])
    if held_ids:  # this IRN, the seed threshold and the walk chosen on the first images: nothing fitted on these
        held = _saved_or(out / "refined_held_out", lambda: _refine_held_out(
            refined, maps, subset, train.subset(held_ids), out / "refined_held_out", refine_cfg, cfg, device,
            progress))
        walk = held["config"]["walk"]  # the chosen walk, as the held-out refinement recorded it
        row.update(seed_crf_held_out=held["seeds_crf"]["miou"], irn_mask_held_out=held["masks"]["miou"],
                   walk_exp_times=walk["exp_times"], walk_bg_threshold=walk["bg_threshold"],
                   walk_crf=float(walk.get("crf", False)))
    if cfg.use_deeplab:
        dl = cfg.deeplab.model_copy(update={"seed": seed, "crop_size": demo.data.canvas,
                                            "init_weights": str(ckpt) if cfg.deeplab_from_classifier else None})
        pseudo = load_manifest(refined["manifests"]["retrain_labels"])
        val = load_manifest(val_path)
        row["deeplab_pseudo"] = _deeplab_miou(pseudo, val, out / "deeplab_pseudo", dl, device, progress)
        # The bound trains as many steps as both rounds of the pseudo-label run: true masks have no
        # ignored pixels to fill, so its recipe is one round.
        steps = dl.iterations * (2 if dl.retrain else 1)
        full = dl.model_copy(update={"retrain": False, "iterations": steps})
        row["deeplab_full"] = _deeplab_miou(subset, val, out / f"deeplab_full_{steps}", full, device, progress)
    return row


def _refine_held_out(refined: dict[str, Any], maps: Path, first: Manifest, held: Manifest, out: Path,
                     refine: RefineConfig, cfg: StudyConfig, device: str, progress: bool) -> dict[str, Any]:
    """The held-out images refined by the IRN trained on ``first``, at the seed threshold chosen on
    ``first`` and with the walk (length, background score, CRF or not) whose IRN masks score best on
    ``first`` (``rib tune``'s walk sweep, :func:`~rib_core.experiments.tune.walk_curve`)."""
    curve = walk_curve(refined["irn_checkpoint"], maps, first, refine, cfg.walk_thresholds, cfg.walk_exp_times,
                       device, cfg.walk_crf)
    exp_times, bg, crf = max(curve, key=lambda key: curve[key])
    chosen = refine.model_copy(update={"seed_threshold": refined["seed_threshold"], "threshold_from_sweep": False,
                                       "walk": refine.walk.tuned(exp_times, bg, crf)})
    return refine_maps(maps, held, out, chosen, refined["irn_checkpoint"], device=device, progress=progress)


def _saved_or(folder: Path, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A refinement's ``report.json`` when an earlier run finished it, else ``make()``."""
    saved = folder / "report.json"
    return json.loads(saved.read_text()) if saved.exists() else make()


def _mean_std(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a)}


def summarise(per_seed: dict[int, dict[str, float]]) -> dict[str, Any]:
    """Mean and sample standard deviation of every row and paired difference over the seeds."""
    rows = [key for key, _ in ROWS if all(key in r for r in per_seed.values())]
    table = {key: _mean_std([r[key] for r in per_seed.values()]) for key in rows}
    diffs = {f"{a} - {b}": _mean_std([r[a] - r[b] for r in per_seed.values()])
             for a, b in DIFFERENCES if a in rows and b in rows}
    summary: dict[str, Any] = {"seeds": sorted(per_seed), "table": table, "differences": diffs}
    if "deeplab_full" in rows:
        summary["deeplab_fraction_of_full"] = _mean_std(
            [r["deeplab_pseudo"] / r["deeplab_full"] for r in per_seed.values()])
    return summary


def merge_studies(studies: list[dict[str, Any]]) -> dict[str, Any]:
    """Seeds of one study run apart (in other sessions or on other machines) as one study: the files
    must agree on every setting but their seeds and hold each seed once. The summary is recomputed
    over all seeds; ``seed_runs`` keeps each file's run record (date, commit, machine) with its seeds."""
    if not studies:
        raise ValueError("no study to merge")
    fixed = ("images", "held_out_images", "val_images", "scenes")  # the note is prose: the last file's is kept

    def settings(study: dict[str, Any]) -> dict[str, Any]:
        config = {k: v for k, v in study["config"].items() if k != "seeds"}
        return {**{k: study.get(k) for k in fixed}, "config": config}

    first = settings(studies[0])
    per_seed: dict[int, dict[str, float]] = {}
    runs: list[dict[str, Any]] = []
    for study in studies:
        if settings(study) != first:
            raise ValueError("the studies differ in a setting other than their seeds: they are not one study")
        seeds = sorted(int(s) for s in study["per_seed"])
        if per_seed.keys() & seeds:
            raise ValueError(f"seed(s) {sorted(per_seed.keys() & seeds)} appear in more than one study")
        per_seed.update({int(s): row for s, row in study["per_seed"].items()})
        runs += study.get("seed_runs") or [{"seeds": seeds, "run": study["run"]}]
    per_seed = dict(sorted(per_seed.items()))
    config = {**studies[0]["config"], "seeds": list(per_seed)}
    return {"seed_runs": runs, **summarise(per_seed), "per_seed": per_seed,
            **{k: studies[0].get(k) for k in fixed}, "note": studies[-1].get("note"), "config": config}


def markdown(summary: dict[str, Any]) -> str:
    """The table as Markdown (percent), for docs/RESULTS.md and study.md; one seed has no sd ("-")."""
    n = len(summary["seeds"])

    def sd(stat: dict[str, float]) -> str:
        return f"{100 * stat['std']:.1f}" if stat["n"] > 1 else "-"

    lines = [f"| stage ({n} seed{'s' * (n > 1)}) | mean % | std |", "|---|---|---|"]
    labels = dict(ROWS)
    for key, stat in summary["table"].items():
        lines.append(f"| {labels[key].strip()} | {100 * stat['mean']:.1f} | {sd(stat)} |")
    lines += ["", "| paired difference | mean (points) | std |", "|---|---|---|"]
    for name, stat in summary["differences"].items():
        a, b = name.split(" - ")
        lines.append(f"| {labels[a].strip()} - {labels[b].strip()} | {100 * stat['mean']:+.1f} | {sd(stat)} |")
    if "deeplab_fraction_of_full" in summary:
        stat = summary["deeplab_fraction_of_full"]
        lines.append(f"| DeepLab pseudo / full supervision | {100 * stat['mean']:.1f}% | {sd(stat)} |")
    return "\n".join(lines) + "\n"


def run_study(out_dir: str | os.PathLike[str], cfg: StudyConfig | None = None, device: str = "cpu",
              progress: bool = True) -> dict[str, Any]:
    """Every seed under ``out_dir/seed_<s>/``; ``study.json`` and ``study.md`` at the top, rewritten
    after each seed (``seeds``: the seeds finished, so a cut-off run leaves them). Resumable."""
    cfg = cfg or StudyConfig()
    job = cfg.job()
    out = Path(out_dir)
    run = run_record(device)  # at the start: the code that ran
    data_dir = out / "data"
    if not (data_dir / "val.jsonl").exists():
        make_scenes(data_dir, job.data)
    train, val_path = load_manifest(data_dir / "train.jsonl"), data_dir / "val.jsonl"
    if job.n_images + cfg.held_out > len(train):
        raise ValueError(f"n_images {job.n_images} + held_out {cfg.held_out} > {len(train)} training images")
    val_images = len(load_manifest(val_path))
    per_seed: dict[int, dict[str, float]] = {}
    summary: dict[str, Any] = {}
    for s in cfg.seeds:
        per_seed[s] = run_seed(s, train, val_path, out / f"seed_{s}", cfg, device, progress)
        summary = {"run": run, **summarise(per_seed), "per_seed": per_seed,
                   "images": job.n_images, "held_out_images": cfg.held_out, "val_images": val_images,
                   "scenes": "demo" if cfg.parts is None else "parts",
                   "note": "seed rows: best threshold of the sweep, chosen on the scored images (as the paper); "
                           "held-out rows: the seed threshold and the walk chosen on the first images; every "
                           "other setting fixed before the run",
                   "config": cfg.model_dump(mode="json")}
        write_study(out, summary)
    return summary


def write_study(out: Path, summary: dict[str, Any]) -> None:
    """``study.json`` and its table, ``study.md``, at the top of the study's folder."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(summary, indent=2))
    (out / "study.md").write_text(markdown(summary))
