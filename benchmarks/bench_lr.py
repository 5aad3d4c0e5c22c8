"""How far RIB's steps move classifiers trained in different ways, at fixed lrs and under the
``first_step`` rule (issue 24, part 1).

The paper's lr (8e-6) was set for an SGD-trained ImageNet ResNet-50. Here classifiers of two
recipes are trained on the same demo scenes, several seeds each: ``scratch`` (AdamW, warm-up and
cosine, weight decay 0.05: the demo's recipe) and ``irn`` (IRN's SGD with poly decay, momentum 1e-4;
from scratch, as no ImageNet weights exist here). For each classifier and each setting, RIB runs on
training scenes and the benchmark records, per image, the first step's relative change of the
target logit sum ((S_1 - S_0) / |S_0|), the change over all steps, how far M moves from the CAM
(mean absolute difference of the max-normalised maps), the step size used, and the seed mIoU.

The scenes are split in two: the best fixed lr and the best ``step_gain`` are chosen per
classifier on the tuning half (seed mIoU at its best threshold) and scored on the other half at
the threshold chosen on the tuning half. Means and standard deviations are over the classifier
seeds::

    OMP_NUM_THREADS=1 python -m benchmarks.bench_lr > docs/results/bench_lr.json

takes about half an hour on 2 CPU cores at the defaults (``--seeds 0 1 2 --images 10``). With
``--work DIR`` each classifier's figures are kept (``DIR/<recipe>_<seed>/bench_lr_<images>.json``)
and a rerun resumes, so the recipes can run as separate processes (``--recipes irn --seeds 2``) and a last
call gathers them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rib_core.classifier.cam import LocalizationMap, compute_cam
from rib_core.classifier.train import train_classifier
from rib_core.config.network_configs import ClassifierTrainConfig
from rib_core.config.rib_config import RibConfig, image_seed
from rib_core.config.stage_configs import EvalConfig, wide_thresholds
from rib_core.data.datasets import Manifest, load_image, load_manifest, load_mask
from rib_core.data.demo_data import DemoDataConfig, make_demo_dataset
from rib_core.data.evaluation import sweep_seeds
from rib_core.rib.companions import CompanionPool
from rib_core.rib.process import RibRunner
from rib_core.runtime.provenance import run_record
from rib_core.training.checkpoints import load_classifier

DATA = DemoDataConfig(n_train=192, n_val=32, canvas=64, digit_size=(26, 40), digits=[0, 1, 2, 3, 4],
                      max_per_image=2, seed=0)
SIZES: dict[str, Any] = {"arch": "resnet18", "crop_size": 64, "resize_long": (48, 80)}
RECIPES = {
    "scratch": ClassifierTrainConfig(recipe="scratch", epochs=8, **SIZES),
    "irn": ClassifierTrainConfig(batch_size=16, epochs=15, lr=0.03, from_scratch=True, **SIZES),
}
RIB = RibConfig(crop_size=64, resize_long=(48, 80), companions=4)
FIXED_LRS = (8e-6, 1e-4, 1e-3)
GAINS = (0.03, 0.3, 1.0)
EVAL = EvalConfig(thresholds=wide_thresholds())


def settings() -> dict[str, RibConfig]:
    """Every RIB setting measured, by name."""
    out = {f"fixed_lr{lr:g}": RIB.model_copy(update={"lr": lr}) for lr in FIXED_LRS}
    out.update({f"first_step_gain{g:g}": RIB.model_copy(update={"lr_rule": "first_step", "step_gain": g})
                for g in GAINS})
    return out


def relative_change(sums: list[float], upto: int) -> float | None:
    """(S_upto - S_0) / |S_0| of the target logit sums, None when the run stopped before."""
    return (sums[upto] - sums[0]) / abs(sums[0]) if len(sums) > upto and sums[0] else None


def seed_scores(maps: dict[str, LocalizationMap], truth: dict[str, np.ndarray], ids: list[str], n: int,
                threshold: float | None = None) -> tuple[float, float]:
    """(mIoU, threshold): at the best threshold of the sweep, or at ``threshold`` when given."""
    sweep = sweep_seeds(((maps[i], truth[i]) for i in ids), n, EVAL)
    if threshold is None:
        return sweep["best"]["miou"], sweep["best_threshold"]
    return sweep["curve"][f"{threshold:.2f}"], threshold


def measure(ckpt: Path, train: Manifest, images: int, seed: int) -> dict[str, Any]:
    """Every setting on the first ``images`` training scenes with one classifier."""
    model, _, extra = load_classifier(ckpt)
    model.eval()
    pool = CompanionPool.from_manifest(train)
    runner = RibRunner(model, pool, RIB)
    records = train.records[:images]
    tuning, scored = [r.id for r in records[: images // 2]], [r.id for r in records[images // 2:]]
    pictures = {r.id: load_image(train.image_uri(r)) for r in records}
    truth = {r.id: load_mask(train.mask_uri(r)) for r in records}
    keys = {r.id: train.label_indices(r) for r in records}
    n = len(train.classes) + 1
    with torch.no_grad():
        cams = {i: compute_cam(model, pictures[i], keys[i]) for i in pictures}
    tuned = seed_scores(cams, truth, tuning, n)
    cam_scored = seed_scores(cams, truth, scored, n, tuned[1])[0]
    out: dict[str, Any] = {"val_map": extra.get("validation", {}).get("map"),
                           "cam": {"tuning_miou": tuned[0], "scored_miou": cam_scored}}
    for name, cfg in settings().items():
        cfg = cfg.model_copy(update={"seed": seed})
        maps, first, total, moved, lrs = {}, [], [], [], []
        for i in pictures:
            outcome = runner.run(pictures[i], keys[i], cfg, seed=image_seed(seed, i))
            maps[i] = outcome.map
            first.append(relative_change(outcome.target_logit_sums, 1))
            total.append(relative_change(outcome.target_logit_sums, len(outcome.target_logit_sums) - 1))
            moved.append(float(np.abs(outcome.map.high_res - cams[i].high_res).mean()))
            lrs.append(outcome.lr)
        tuned = seed_scores(maps, truth, tuning, n)
        out[name] = {"first_step_change": _mean([v for v in first if v is not None]),
                     "all_steps_change": _mean([v for v in total if v is not None]),
                     "map_change": _mean(moved), "lr_median": float(np.median(lrs)),
                     "lr_spread": [float(np.percentile(lrs, 10)), float(np.percentile(lrs, 90))],
                     "tuning_miou": tuned[0], "scored_miou": seed_scores(maps, truth, scored, n, tuned[1])[0]}
    return out


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def spread(values: list[float | None]) -> dict[str, float] | None:
    """Mean and sample standard deviation over the seeds, rounded for the table."""
    kept = [v for v in values if v is not None]
    if not kept:
        return None
    sd = statistics.stdev(kept) if len(kept) > 1 else 0.0
    digits = 4 if abs(statistics.mean(kept)) >= 1e-3 else 8
    return {"mean": round(statistics.mean(kept), digits), "sd": round(sd, digits)}


def chosen(per_seed: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    """Per seed, the setting of ``prefix`` best on the tuning half, and its score on the other half."""
    picks = [max((k for k in run if k.startswith(prefix)), key=lambda k: run[k]["tuning_miou"]) for run in per_seed]
    return {"picked": picks,
            "scored_miou": spread([run[k]["scored_miou"] for run, k in zip(per_seed, picks, strict=True)]),
            "gain_over_cam": spread([run[k]["scored_miou"] - run["cam"]["scored_miou"]
                                     for run, k in zip(per_seed, picks, strict=True)])}


def summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per recipe: every setting's figures as mean and sd over seeds, and the choices on the tuning half."""
    out: dict[str, Any] = {}
    for recipe, per_seed in runs.items():
        rows: dict[str, Any] = {"val_map": spread([r["val_map"] for r in per_seed]),
                                "cam_scored_miou": spread([r["cam"]["scored_miou"] for r in per_seed])}
        for name in settings():
            rows[name] = {key: spread([r[name][key] for r in per_seed])
                          for key in ("first_step_change", "map_change", "lr_median", "scored_miou")}
        rows["chosen_fixed"] = chosen(per_seed, "fixed_")
        rows["chosen_first_step"] = chosen(per_seed, "first_step_")
        out[recipe] = rows
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="classifier seeds of each recipe")
    p.add_argument("--images", type=int, default=10, help="training scenes RIB runs on (half tune, half scored)")
    p.add_argument("--work", type=Path, help="keep the data, classifiers and figures here (default: a temporary "
                   "folder); a rerun resumes")
    p.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=list(RECIPES))
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        train = (load_manifest(work / "data" / "train.jsonl") if (work / "data" / "val.jsonl").exists()
                 else make_demo_dataset(work / "data", DATA).train)
        runs: dict[str, list[dict[str, Any]]] = {}
        for recipe in args.recipes:
            for seed in args.seeds:
                folder = work / f"{recipe}_{seed}"
                ckpt, figures = folder / "classifier.pth", folder / f"bench_lr_{args.images}.json"
                if not ckpt.exists():
                    train_classifier(train, folder, RECIPES[recipe].model_copy(update={"seed": seed}),
                                     progress=False, val_manifest=work / "data" / "val.jsonl")
                if not figures.exists():
                    print(f"{recipe} seed {seed}: measuring", file=sys.stderr)
                    figures.write_text(json.dumps(measure(ckpt, train, args.images, seed)))
                runs.setdefault(recipe, []).append(json.loads(figures.read_text()))
    result = {"run": run_record("cpu"), "data": DATA.model_dump(mode="json"), "rib": RIB.model_dump(
        mode="json", include={"iterations", "companions", "crop_size", "resize_long", "pooling"}),
        "images": {"tuning": args.images // 2, "scored": args.images - args.images // 2}, "seeds": len(args.seeds),
        "recipes": summary(runs), "per_seed": runs}
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
