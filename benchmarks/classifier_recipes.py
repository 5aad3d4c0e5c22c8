"""Validation mAP of a classifier recipe on several MNIST-scene recipes and seeds.

Each (scene recipe, seed) makes fresh scenes with that data seed (train and validation splits
from disjoint halves of the digits), trains a classifier with that seed and scores every epoch on
the validation split. Choose settings on ``--seeds 100`` (a tuning seed) and report on others, so
that the reported images are never the ones a setting was chosen on.

    OMP_NUM_THREADS=1 python -m benchmarks.classifier_recipes --seeds 1 2 --out runs/recipes
    python -m benchmarks.classifier_recipes --scenes demo --seeds 100 --set epochs=4   # tuning

Writes ``OUT/results.json`` (every run, with its per-epoch curve) and prints a table of mean and
sample standard deviation per scene recipe.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rib_core.classifier.train import ClassifierTrainConfig, train_classifier
from rib_core.data.demo_data import DemoDataConfig
from rib_core.data.part_scenes import PREMISE_SCENES, make_scenes
from rib_core.experiments.demo_job import DemoJobConfig, digit_pretraining, scene_classifier, scene_scale
from rib_core.training.checkpoints import load_classifier

# Scene recipes: the demo's, and others that differ in canvas, background, colour and count (their
# sizes and seed are set per run).
SCENES: dict[str, DemoDataConfig] = {
    "demo": DemoJobConfig().data,
    "old-demo-64": DemoDataConfig(canvas=64, digit_size=(26, 40), max_per_image=2),
    "texture-96": DemoDataConfig(canvas=96, digit_size=(32, 48), max_per_image=3, background="texture"),
    "grey-3-per-112": DemoDataConfig(canvas=112, digit_size=(30, 44), min_per_image=3, max_per_image=3,
                                     background="flat", colour="grey"),
    # issue 24's unseen recipe (never used to choose a setting): large grey digits on textured 128 px canvases
    "texture-large-grey-128": DemoDataConfig(canvas=128, digit_size=(60, 100), background="texture", colour="grey"),
    # the premise benchmark's part scenes (rib_core.data.part_scenes), as the study at size uses them
    "parts": PREMISE_SCENES,
}


def classifier_for(canvas: int, overrides: dict[str, Any]) -> ClassifierTrainConfig:
    """The scene recipe at this canvas (:func:`scene_classifier`), with ``overrides``."""
    return ClassifierTrainConfig.model_validate({**scene_classifier(canvas).model_dump(), **overrides})


def run_one(scene: str, seed: int, out: Path, n_train: int, n_val: int, overrides: dict[str, Any],
            pretrain: bool, pretrain_overrides: dict[str, Any], name: str = "classifier") -> dict[str, Any]:
    """Fresh scenes of ``scene`` with data seed ``seed``, the digit pretraining (kept in the seed's
    folder and shared by every ``name``), then the scene training into ``out/<scene>-seed<seed>/<name>``."""
    data_cfg = SCENES[scene].model_copy(update={"n_train": n_train, "n_val": n_val, "seed": seed})
    folder = out / f"{scene}-seed{seed}"
    data = make_scenes(folder / "data", data_cfg)
    cfg = classifier_for(data_cfg.canvas, {**overrides, "seed": seed})
    started = time.perf_counter()
    demo = DemoJobConfig()
    if demo.pretrain is not None and pretrain:
        pretrain_cfg = demo.pretrain.model_copy(update={**pretrain_overrides, "seed": seed})
        start = digit_pretraining(folder / "pretrain", data_cfg, pretrain_cfg, demo.pretrain_images,
                                  scene_scale(cfg, data_cfg.canvas), progress=False)
        cfg = cfg.model_copy(update={"init_weights": str(start)})
    ckpt = train_classifier(data.train, folder / name, cfg, progress=False, resume=False,
                            val_manifest=folder / "data" / "val.jsonl")
    seconds = time.perf_counter() - started
    validation = load_classifier(ckpt)[2]["validation"]
    report = json.loads((folder / name / "train_report.json").read_text())
    return {"scene": scene, "seed": seed, "map": validation["map"], "f1": validation["f1"],
            "epochs_run": len(report["epochs"]), "epoch_kept": validation["epoch"],
            "train_s": round(seconds, 1), "curve": [round(e["map"], 4) for e in report["epochs"]],
            "config": cfg.model_dump()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", nargs="+", default=list(SCENES), choices=list(SCENES))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    p.add_argument("--n-train", type=int, default=DemoJobConfig().data.n_train)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="classifier setting")
    p.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=JSON",
                   help="single-digit pretraining setting")
    p.add_argument("--out", default="runs/classifier_recipes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-pretrain", action="store_true", help="without the demo's single-digit pretraining")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    overrides, pretrain_overrides = ({k: json.loads(v) for k, _, v in (s.partition("=") for s in sets)}
                                     for sets in (args.set, args.pretrain_set))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for scene in args.scenes:
        for seed in args.seeds:
            results.append(run_one(scene, seed, out, args.n_train, args.n_val, overrides, not args.no_pretrain,
                                   pretrain_overrides))
            r = results[-1]
            print(f"{scene:<16} seed {seed}: val mAP {100 * r['map']:.1f}  F1 {100 * r['f1']:.1f}  "
                  f"{r['train_s']:.0f} s  per epoch {[round(100 * m, 1) for m in r['curve']]}", flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n| scene recipe | seeds | val mAP % (mean ± std) | F1 % | train s |\n|---|---|---|---|---|")
    for scene in args.scenes:
        rows = [r for r in results if r["scene"] == scene]
        maps, f1s = np.array([r["map"] for r in rows]) * 100, np.array([r["f1"] for r in rows]) * 100
        ddof = 1 if len(rows) > 1 else 0
        print(f"| {scene} | {', '.join(str(r['seed']) for r in rows)} | {maps.mean():.1f} ± {maps.std(ddof=ddof):.1f} "
              f"| {f1s.mean():.1f} ± {f1s.std(ddof=ddof):.1f} | {np.mean([r['train_s'] for r in rows]):.0f} |")


if __name__ == "__main__":
    main()
