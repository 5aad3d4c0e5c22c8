"""Settings for a new data set, chosen on a small labelled subset by the final pseudo-mask (``rib tune``).

The paper's RIB learning rate (8e-6) was tuned for an ImageNet ResNet-50 at 512 px on VOC; another
classifier, image size or data set needs its own. Given tens of images with ground-truth masks,
:func:`tune` runs RIB at every point of its grid (lr x iterations x pooling, and the ``first_step``
rule's gains, :class:`RibConfig`) and scores the seeds (each at its best background threshold). The
choice is made on the **final pseudo-mask**, not on the seed: a larger step raises every map, and
IRN's confident-label thresholds, fixed, can then leave most pixels unlabelled and the mask
collapses while the seed still improves. So for each RIB setting (or the ``mask_candidates`` best by
seed) and each pair of confident-label thresholds, IRN is trained on the tuning subset's labels and
the random walk's length (``exp_times``: 2^k steps) and background threshold are swept, its mask as
IRN leaves it and through a dense CRF (``walk.crf``, ``TuneConfig.walk_crf``); the (RIB setting,
thresholds, walk) of the best mask wins, the starting setting winning ties. The walk's length is
swept because its reach depends on the map's size: 2^8 steps of radius 5 spread a class over about a
third of a VOC image's ~125 px stride-4 map, but over all of a small image's map. Only the tuning
subset is used to choose; ``score_on`` (other images) reports how the choice holds on images it
never saw, against the settings it started from (the paper's, by default): the seeds at the
threshold chosen on the tuning subset, those seeds + CRF (the mask IRN has to beat), and the masks,
each from the IRN trained on the tuning subset with its own maps and thresholds.

It writes ``rib.json`` (a :class:`RibConfig`, for ``rib rib --config``, ``RIB_RIB_DEFAULTS`` and a
request's ``rib``), ``refine.json`` (a :class:`RefineConfig`, for ``rib refine --config``) and
``tune_report.json`` (every point of every sweep).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rib_core.classifier.cam import LocalizationMap
from rib_core.config.rib_config import RibConfig
from rib_core.config.stage_configs import RandomWalkConfig, RefineConfig
from rib_core.data.datasets import Manifest, load_image, load_manifest, load_mask, median_long_side
from rib_core.data.evaluation import confusion, scores, sweep_folder
from rib_core.experiments.tune_config import SWEPT, TuneConfig, grid_of, setting_name
from rib_core.refine.irn import boundary_map, load_irn
from rib_core.refine.pseudo_masks import refine_maps, walk_mask
from rib_core.refine.random_walk import walk_scores_at
from rib_core.rib.batching import run_rib
from rib_core.rib.companions import CompanionPool
from rib_core.training.checkpoints import load_classifier


def _masked(manifest: Manifest, what: str, limit: int | None = None) -> Manifest:
    if limit:
        manifest = manifest.subset([r.id for r in manifest.records[:limit]])
    missing = [r.id for r in manifest.records if r.mask is None]
    if missing or not len(manifest):
        raise ValueError(f"every image of the {what} manifest needs a ground-truth mask "
                         f"({len(missing)} of {len(manifest)} have none, e.g. {missing[:3]})")
    return manifest


def sweep_rib(model: Any, manifest: Manifest, pool: CompanionPool, out: Path, cfg: TuneConfig, device: str,
              progress: bool) -> list[dict[str, Any]]:
    """Seeds of every RIB setting of the grid on ``manifest``; rows sorted best first (a stable
    sort: ties keep the grid's order, which starts from the starting setting)."""
    rows = []
    for rib in grid_of(cfg):
        maps = run_rib(model, manifest, pool, out / "rib" / setting_name(rib), rib, device, progress)
        sweep = sweep_folder(maps, manifest, cfg.evaluation)
        rows.append({"setting": setting_name(rib), **{k: getattr(rib, k) for k in SWEPT},
                     "seed_miou": sweep["best"]["miou"], "seed_threshold": sweep["best_threshold"],
                     "maps": str(maps)})
    return sorted(rows, key=lambda row: -row["seed_miou"])


def walk_curve(irn_checkpoint: str, maps: Path, manifest: Manifest, refine: RefineConfig,
               thresholds: Sequence[float], exp_times: Sequence[int], device: str,
               crfs: Sequence[bool] = (False,)) -> dict[tuple[int, float, bool], float]:
    """IRN mask mIoU by (walk length, background threshold, CRF after the walk or not: ``crfs``,
    ``walk.crf`` with ``refine.crf``); IRN's boundary map is computed once per image, and one walk
    per image gives every length and both kinds of mask."""
    model, _ = load_irn(irn_checkpoint)
    model.to(device)
    n = len(manifest.classes) + 1
    # Plain masks first, so that a tie goes to IRN's own walk (as the starting setting wins ties)
    confs = {(e, t, c): np.zeros((n, n), np.int64) for c in crfs for e in exp_times for t in thresholds}
    for r in manifest.records:
        lmap = LocalizationMap.load(maps / f"{r.id}.npz")
        image = load_image(manifest.image_uri(r))
        boundary = boundary_map(model, image, device)
        gt = load_mask(manifest.mask_uri(r))
        for e, walked in walk_scores_at(lmap, boundary, refine.walk, exp_times).items():
            for t, c in itertools.product(thresholds, crfs):
                confs[e, t, c] += confusion(walk_mask(image, walked, lmap.keys, t, refine.crf if c else None), gt, n)
    return {key: scores(c)["miou"] for key, c in confs.items()}


def _curve_json(curve: dict[tuple[int, float, bool], float]) -> dict[str, dict[str, float]]:
    """By walk length (``"3"``; ``"3+crf"`` with the CRF after the walk), then background score."""
    out: dict[str, dict[str, float]] = {}
    for (e, t, crf), v in curve.items():
        out.setdefault(f"{e}+crf" if crf else str(e), {})[f"{t:.2f}"] = v
    return out


def _refine_for(refine: RefineConfig, seed_threshold: float, fg: float, bg: float) -> RefineConfig:
    """``refine`` with a fixed seed threshold and the confident-label thresholds ``fg`` / ``bg``."""
    labels = refine.labels.model_copy(update={"fg_threshold": fg, "bg_threshold": bg})
    return refine.model_copy(update={"seed_threshold": seed_threshold, "threshold_from_sweep": False, "labels": labels})


def sweep_masks(rows: list[dict[str, Any]], manifest: Manifest, out: Path, cfg: TuneConfig, classifier: str,
                device: str, progress: bool) -> list[dict[str, Any]]:
    """The final pseudo-mask of each candidate RIB setting of ``rows`` x each pair of confident-label
    thresholds on ``manifest``: IRN trained on that setting's labels, then the walk swept
    (:func:`walk_curve`). Rows sorted best first, a stable sort from the starting setting and pair."""
    start, start_pair = setting_name(cfg.rib), (cfg.refine.labels.fg_threshold, cfg.refine.labels.bg_threshold)
    candidates = rows if cfg.mask_candidates is None else rows[: cfg.mask_candidates]
    candidates = [r for r in rows if r["setting"] == start] + [r for r in candidates if r["setting"] != start]
    masks = []
    for row, (fg, bg) in itertools.product(candidates, dict.fromkeys([start_pair, *cfg.label_thresholds])):
        refine = _refine_for(cfg.refine, row["seed_threshold"], fg, bg)
        refined = refine_maps(row["maps"], manifest, out / "refine" / f"{row['setting']}_fg{fg:g}_bg{bg:g}", refine,
                              device=device, progress=progress, classifier=classifier)
        curve = walk_curve(refined["irn_checkpoint"], Path(row["maps"]), manifest, refine, cfg.walk_thresholds,
                           cfg.walk_exp_times, device, cfg.walk_crf)
        exp_times, walk_bg, walk_crf = max(curve, key=lambda key: curve[key])
        plain = [v for (_, _, crf), v in curve.items() if not crf]
        masks.append({"setting": row["setting"], "fg_threshold": fg, "bg_threshold": bg,
                      "mask_miou": curve[exp_times, walk_bg, walk_crf], "walk_exp_times": exp_times,
                      "walk_bg_threshold": walk_bg, "walk_crf": walk_crf,
                      "mask_miou_without_crf": max(plain) if plain else None,
                      "labels_miou": refined["ir_labels"]["miou"],
                      "labels_ignored_fraction": refined["ir_labels"]["ignored_fraction"],
                      "seed_crf_miou": refined["seeds_crf"]["miou"], "irn_checkpoint": refined["irn_checkpoint"],
                      "walk_curve": _curve_json(curve)})
    return sorted(masks, key=lambda row: -row["mask_miou"])


def _held_out(model: Any, manifest: Manifest, pool: CompanionPool, out: Path, cfg: TuneConfig,
              chosen: RibConfig, chosen_threshold: float, default_threshold: float,
              walks: dict[str, tuple[str, RandomWalkConfig]] | None, device: str, progress: bool) -> dict[str, Any]:
    """The chosen setting against the starting one on images that took no part in the choice;
    with ``walks`` (per side: the IRN trained on the tuning subset with its maps and thresholds,
    and its walk) their final masks too."""
    report: dict[str, Any] = {"images": len(manifest)}
    for label, rib, threshold in (("default", cfg.rib, default_threshold), ("tuned", chosen, chosen_threshold)):
        maps = run_rib(model, manifest, pool, out / "held_out" / setting_name(rib), rib, device, progress)
        # Both thresholds were chosen on the tuning subset from cfg.evaluation's, so one sweep here
        # gives the score at the chosen threshold and the best over these images (an oracle).
        sweep = sweep_folder(maps, manifest, cfg.evaluation)
        # Seed + CRF as the refinement without IRN gives it: the mask to beat (and to use where IRN does not).
        without_irn = cfg.refine.model_copy(update={"seed_threshold": threshold, "threshold_from_sweep": False,
                                                    "use_irn": False})
        crf = refine_maps(maps, manifest, out / "held_out" / f"crf_{setting_name(rib)}", without_irn, device=device,
                          progress=progress)
        report[label] = {"setting": setting_name(rib), "seed_threshold": threshold,
                         "seed_miou": sweep["curve"][f"{threshold:.2f}"],
                         "seed_miou_oracle_threshold": sweep["best"]["miou"], "seed_crf_miou": crf["seeds_crf"]["miou"]}
        if walks is not None:
            irn_checkpoint, walk = walks[label]
            curve = walk_curve(irn_checkpoint, maps, manifest, cfg.refine.model_copy(update={"walk": walk}),
                               [walk.bg_threshold], [walk.exp_times], device, [walk.crf])
            mask = next(iter(curve.values()))
            report[label].update(walk_exp_times=walk.exp_times, walk_bg_threshold=walk.bg_threshold,
                                 walk_crf=walk.crf, mask_miou=mask,
                                 mask_minus_seed_crf=mask - report[label]["seed_crf_miou"])
    report["gain"] = report["tuned"]["seed_miou"] - report["default"]["seed_miou"]
    if walks is not None:
        report["mask_gain"] = report["tuned"]["mask_miou"] - report["default"]["mask_miou"]
    return report


def tune(classifier: str, manifest: Manifest | str, out_dir: str | os.PathLike[str], cfg: TuneConfig | None = None,
         companions: Manifest | str | None = None, score_on: Manifest | str | None = None, device: str = "cpu",
         progress: bool = True) -> dict[str, Any]:
    """Sweep on ``manifest`` (every image needs a mask), write the chosen settings; see the module doc."""
    cfg = cfg or TuneConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tuning = _masked(manifest if isinstance(manifest, Manifest) else load_manifest(manifest), "tuning", cfg.limit)
    held = None if score_on is None else _masked(
        score_on if isinstance(score_on, Manifest) else load_manifest(score_on), "score_on")
    overlap = set() if held is None else {r.id for r in held.records} & {r.id for r in tuning.records}
    if overlap:  # refused before any work
        raise ValueError(f"score_on shares {len(overlap)} image(s) with the tuning manifest, e.g. "
                         f"{sorted(overlap)[:3]}: score on images the choice never saw")
    model, _, _ = load_classifier(classifier, tuning.classes)
    pool_manifest = companions if companions is not None else tuning
    pool_manifest = pool_manifest if isinstance(pool_manifest, Manifest) else load_manifest(pool_manifest)
    pool = CompanionPool.from_manifest(pool_manifest)
    # The sizes are fixed before the sweep, so every setting and rib.json share them.
    fitted, sizes_note = cfg.rib.fitted_to(median_long_side(pool_manifest))
    cfg = cfg.model_copy(update={"rib": fitted})
    rows = sweep_rib(model, tuning, pool, out, cfg, device, progress)
    report: dict[str, Any] = {"tuning_images": len(tuning), "rib_sweep": rows, "sizes": sizes_note}
    walks: dict[str, tuple[str, RandomWalkConfig]] | None = None
    if cfg.tune_walk and cfg.refine.use_irn:
        masks = sweep_masks(rows, tuning, out, cfg, classifier, device, progress)
        top = masks[0]
        start_pair = (cfg.refine.labels.fg_threshold, cfg.refine.labels.bg_threshold)
        start = next(m for m in masks if m["setting"] == setting_name(cfg.rib)
                     and (m["fg_threshold"], m["bg_threshold"]) == start_pair)
        best = next(row for row in rows if row["setting"] == top["setting"])
        refine = _refine_for(cfg.refine, best["seed_threshold"], top["fg_threshold"], top["bg_threshold"])
        refine = refine.model_copy(update={"walk": refine.walk.tuned(top["walk_exp_times"], top["walk_bg_threshold"],
                                                                     top["walk_crf"])})
        report.update(chosen_by="final mask", mask_sweep=[{k: v for k, v in m.items() if k != "walk_curve"}
                                                          for m in masks],
                      walk_curve=top["walk_curve"], walk_bg_threshold=top["walk_bg_threshold"],
                      walk_exp_times=top["walk_exp_times"], walk_crf=top["walk_crf"],
                      irn_checkpoint=top["irn_checkpoint"],
                      labels={"fg_threshold": top["fg_threshold"], "bg_threshold": top["bg_threshold"]})
        walks = {"default": (start["irn_checkpoint"], cfg.refine.walk), "tuned": (top["irn_checkpoint"], refine.walk)}
    else:
        best = rows[0]
        refine = cfg.refine.model_copy(update={"seed_threshold": best["seed_threshold"], "threshold_from_sweep": False})
        report["chosen_by"] = "seed"
    chosen = cfg.rib.model_copy(update={k: best[k] for k in SWEPT})
    report.update(chosen=best["setting"], seed_threshold=best["seed_threshold"])
    if held is not None:
        default_threshold = next(row["seed_threshold"] for row in rows if row["setting"] == setting_name(cfg.rib))
        report["held_out"] = _held_out(model, held, pool, out, cfg, chosen, best["seed_threshold"],
                                       default_threshold, walks, device, progress)
    (out / "rib.json").write_text(json.dumps(chosen.model_dump(mode="json"), indent=2))
    (out / "refine.json").write_text(json.dumps(refine.model_dump(mode="json"), indent=2))
    report["config"] = cfg.model_dump(mode="json")
    (out / "tune_report.json").write_text(json.dumps(report, indent=2))
    return report
