"""CAM and RIB on scenes with the paper's premise (issue 24, part 3): does RIB recover the part CAM misses?

The scenes are :mod:`rib_core.data.part_scenes`: a digit "head" whose class evidence is strong, on a
"body" several times its size whose style is only weakly class-specific; the mask is head + body.
Per seed (fresh scenes and a fresh classifier: the demo's recipe, single-digit pretraining then
scene training, :func:`~rib_core.experiments.demo_job.train_demo_classifier`), on the first
``--images`` training scenes: CAM, RIB-GNDRP at the paper's settings (K 10, lr 8e-6) and with the
``first_step`` rule (step gain 0.3), each seed at the best threshold of its sweep (chosen on the
scored images, as the paper reports seeds), each RIB seed + CRF, and with ``--irn`` the IRN mask
(the demo's refinement, :func:`~rib_core.jobs.stages.refine_stage`). Every stage gets mIoU,
precision, recall, the recall of head and body pixels, and where the map's mass sits (own heads,
own bodies, elsewhere). Mean ± sd over seeds and the paired differences RIB − CAM::

    OMP_NUM_THREADS=1 python -m benchmarks.bench_premise --seeds 0 1 2 --irn --work runs/premise \\
        --out docs/results/bench_premise.json

The recipe's knobs (canvas, head and body sizes, ``body_style_p``) were chosen on tuning seeds
(scenes 100, classifier 101: ``--seeds 100 --train-seeds 101 --cam-only``), never on seeds 0-2.
The JSON is rewritten after each seed (``seeds_done``), so a cut-off run leaves its finished seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import sections
from benchmarks.bench_lr import spread
from rib_core.classifier.cam import run_cam
from rib_core.data.datasets import Manifest, load_manifest, load_mask
from rib_core.data.evaluation import seed_from_map, sweep_folder
from rib_core.data.part_scenes import (
    OBJECTS,
    PARTS,
    PREMISE_SCENES,
    PartSceneConfig,
    layer_path,
    make_part_scenes,
    part_mass,
    part_recall,
)
from rib_core.experiments.demo_job import DemoJobConfig, canvas_rib, fitted_job, starting_job, train_demo_classifier
from rib_core.io.localization_map import LocalizationMap
from rib_core.jobs.stages import maps_stage, refine_stage
from rib_core.runtime.provenance import run_record
from rib_core.training.checkpoints import load_classifier

DATA = PREMISE_SCENES
# The demo's RIB with its sizes scaled to the canvas (crop = canvas, resize-long 0.75-1.25 of it).
RIB = canvas_rib(DATA.canvas)
SETTINGS = {"rib_paper": RIB, "rib_first_step": RIB.model_copy(update={"lr_rule": "first_step", "step_gain": 0.3})}
METRICS = ("miou", "precision", "recall", "head_recall", "body_recall", "mass_head", "mass_body", "mass_elsewhere")


def score_maps(maps: Path, subset: Manifest, job: DemoJobConfig) -> dict[str, float]:
    """A folder of maps: the seed's scores at the best threshold of the sweep, the head and body
    recall of that seed, and the shares of the maps' mass on own head squares, own bodies and elsewhere."""
    sweep = sweep_folder(maps, subset, job.refine.evaluation)
    mass, hits = np.zeros(3), np.zeros(4, np.int64)
    for r in subset.records:
        m = LocalizationMap.load(maps / f"{r.id}.npz")
        mask = load_mask(subset.mask_uri(r))
        parts, objects = (load_mask(str(layer_path(subset.mask_uri(r), layer))) for layer in (PARTS, OBJECTS))
        mass += part_mass(m, parts, objects)
        hits += part_recall(seed_from_map(m, sweep["best_threshold"]), mask, parts)
    best = sweep["best"]
    return {"miou": best["miou"], "precision": best["precision"], "recall": best["recall"],
            "threshold": sweep["best_threshold"], "head_recall": hits[0] / hits[1], "body_recall": hits[2] / hits[3],
            **{f"mass_{k}": v for k, v in zip(("head", "body", "elsewhere"), mass / mass.sum(), strict=True)}}


def mask_scores(report: dict[str, Any]) -> dict[str, float]:
    return {k: report[k] for k in ("miou", "precision", "recall")}


def run_seed(work: Path, data_seed: int, train_seed: int, data: PartSceneConfig, images: int, cam_only: bool,
             irn: bool) -> dict[str, Any]:
    """Every stage with one seed under ``work`` (resumable: each stage keeps what it wrote)."""
    job = fitted_job(starting_job(), data.model_copy(update={"seed": data_seed}), irn=irn)
    if not (work / "data" / "val.jsonl").exists():
        make_part_scenes(work / "data", job.data)
    train = load_manifest(work / "data" / "train.jsonl")
    classifier = train_demo_classifier(work, job, train, work / "data" / "val.jsonl", "cpu", False, train_seed)
    ckpt = work / "classifier" / "classifier.pth"
    ids = [r.id for r in train.records[:images]]
    subset = train.subset(ids)
    cam = run_cam(load_classifier(ckpt)[0], subset, work / "cam", job.cam, "cpu", False)
    row: dict[str, Any] = {"data_seed": data_seed, "train_seed": train_seed, "classifier_map": classifier["val_map"],
                           "cam": score_maps(cam, subset, job)}
    if cam_only:
        return row
    refine = job.refine.model_copy(update={"irn": job.refine.irn.model_copy(update={"seed": train_seed})})
    for name, rib in SETTINGS.items():
        folder = work / name
        maps = maps_stage(folder, train, ids, ckpt, rib.model_copy(update={"seed": train_seed}), "cpu", False)
        row[name] = score_maps(maps, subset, job)
        saved = folder / "refined" / "report.json"
        refined = json.loads(saved.read_text()) if saved.exists() else refine_stage(folder, subset, ckpt, refine)
        row[f"{name}_crf"] = mask_scores(refined["seeds_crf"])
        if irn:
            row[f"{name}_irn"] = mask_scores(refined["masks"])
    return row


def summary(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Every stage's figures as mean ± sd over the seeds, and the paired differences RIB − CAM."""
    stages = [k for k, v in per_seed[0].items() if isinstance(v, dict)]
    table = {s: {m: spread([r[s][m] for r in per_seed]) for m in METRICS if m in per_seed[0][s]} for s in stages}
    paired = {f"{s} - cam": {m: spread([r[s][m] - r["cam"][m] for r in per_seed]) for m in ("miou", "recall")}
              for s in stages if s != "cam"}
    return {"classifier_map": spread([r["classifier_map"] for r in per_seed]), "stages": table, "paired": paired}


LABELS = {"cam": "CAM seed", "rib_paper": "RIB-GNDRP seed, lr 8e-6 (paper)",
          "rib_first_step": "RIB-GNDRP seed, first_step 0.3", "rib_paper_crf": "RIB-GNDRP (8e-6) seed + CRF",
          "rib_first_step_crf": "RIB-GNDRP (first_step) seed + CRF", "rib_paper_irn": "RIB-GNDRP (8e-6) + IRN mask",
          "rib_first_step_irn": "RIB-GNDRP (first_step) + IRN mask"}
HOWTO = ("OMP_NUM_THREADS=1 python -m benchmarks.bench_premise --seeds 0 1 2 --irn --work runs/premise "
         "--out docs/results/bench_premise.json")


def _pm(value: dict[str, float] | None, sign: bool = False) -> str:
    """mean ± sd in percent (points with ``sign``)."""
    if value is None:
        return "-"
    return f"{100 * value['mean']:{'+' if sign else ''}.1f} ± {100 * value['sd']:.1f}"


def stage_table(result: dict[str, Any], short: bool = False) -> str:
    """The stage table (mean ± sd over the seeds done); ``short``: the README's columns."""
    stages, paired = result["stages"], result["paired"]
    head = ["stage", "mIoU %", "recall %", "head / body recall %", "map mass on head / body %", "mIoU − CAM (points)"]
    if not short:
        head[2:2] = ["precision %"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for key, row in stages.items():
        if short and key not in ("cam", "rib_paper", "rib_first_step"):
            continue
        parts = f"{_pm(row.get('head_recall'))} / {_pm(row.get('body_recall'))}" if "head_recall" in row else "-"
        mass = f"{_pm(row.get('mass_head'))} / {_pm(row.get('mass_body'))}" if "mass_head" in row else "-"
        cells = [LABELS[key], _pm(row["miou"]), _pm(row["recall"]), parts, mass,
                 _pm(paired.get(f"{key} - cam", {}).get("miou"), sign=True)]
        if not short:
            cells[2:2] = [_pm(row["precision"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scope(result: dict[str, Any]) -> str:
    """One sentence: the seeds done, the images, the scenes, and how seeds are scored."""
    planned, done = len(result["seeds"]), result["seeds_done"]
    partial = "" if done == planned else f" PARTIAL: {done} of the {planned} planned seeds finished."
    d = result["data"]
    pairs = ", ".join(f"({a}, {b})" for a, b in result["seeds"][:done])
    return (f"Seeds done (scene seed, classifier seed): {pairs}; {result['images']} training scenes scored per "
            f"seed; {d['canvas']} px part scenes, heads {d['digit_size'][0]}-{d['digit_size'][1]} px, bodies "
            f"{d['body_area'][0]}-{d['body_area'][1]}x the head's square, preferred body style with p = "
            f"{d['body_style_p']}; classifier val mAP "
            f"{_pm(result['classifier_map'])}%. Seeds at the best threshold of the sweep (chosen on the scored "
            f"images, as the paper); head / body recall: of the head's strokes and the body's pixels; mass: the "
            f"share of the labelled classes' maps on their own heads' squares / bodies.{partial}")


def section(result: dict[str, Any] | None) -> str:
    """docs/RESULTS.md's section: provenance, scope, the stage table, the per-seed mIoU."""
    return sections.section("## Scenes with the paper's premise (`benchmarks/bench_premise.py`, "
                            "`docs/results/bench_premise.json`)", result, f"`{HOWTO}`", _paragraphs)


def _paragraphs(result: dict[str, Any]) -> list[str]:
    per_seed = ["| stage | " + " | ".join(f"seed {r['data_seed']}" for r in result["per_seed"]) + " |",
                "|---" * (1 + len(result["per_seed"])) + "|"]
    for key in result["stages"]:
        per_seed.append(f"| {LABELS[key]} | " + " | ".join(f"{100 * r[key]['miou']:.1f}" for r in result["per_seed"])
                        + " |")
    return [sections.provenance(result), f"Made by `{HOWTO}`. " + scope(result), stage_table(result), goal(result),
            "mIoU % per seed:", "\n".join(per_seed)]


def goal(result: dict[str, Any]) -> str:
    """Issue 24's goal for each RIB seed: the paired mean of RIB − CAM above twice its sd."""
    if result["seeds_done"] < 2:
        return "The goal (paired mean of RIB − CAM above twice its sd) needs two seeds or more."
    verdicts = []
    for key in ("rib_paper", "rib_first_step"):
        d = result["paired"].get(f"{key} - cam", {}).get("miou")
        if d is not None:
            met = d["mean"] > 0 and d["mean"] > 2 * d["sd"]
            verdicts.append(f"{LABELS[key]} − CAM {_pm(d, sign=True)} points: goal {'met' if met else 'not met'}")
    return "Goal (paired mean of the seed's mIoU − CAM's above twice its sd): " + "; ".join(verdicts) + "."


def readme_block(result: dict[str, Any] | None) -> str:
    """The README's block: what the scenes are, provenance and the short stage table."""
    what = ("Scenes with the paper's premise (`benchmarks/bench_premise.py`: digit heads on larger, weakly "
            "class-specific bodies, mask = head + body; mean ± sd over held-out seeds)")
    if result is None:
        return f"{what}: no result committed yet: `{HOWTO}`."
    return "\n\n".join([f"{what}. {sections.provenance(result)}", stage_table(result, short=True)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="scene seeds (fresh data per seed)")
    p.add_argument("--train-seeds", nargs="+", type=int, help="classifier and RIB seeds (default: the scene seeds)")
    p.add_argument("--images", type=int, default=16, help="training scenes scored (RIB runs on them)")
    p.add_argument("--work", type=Path, required=True, help="every seed's folder; a rerun resumes")
    p.add_argument("--out", type=Path, help="the JSON (default: stdout at the end)")
    p.add_argument("--cam-only", action="store_true", help="stop after CAM (the premise measurement)")
    p.add_argument("--irn", action="store_true", help="also train IRN and score its masks")
    p.add_argument("--body-style-p", type=float, default=DATA.body_style_p)
    p.add_argument("--body-area", nargs=2, type=float, default=DATA.body_area)
    args = p.parse_args()
    torch.set_num_threads(1)
    train_seeds = args.train_seeds or args.seeds
    data = DATA.model_copy(update={"body_style_p": args.body_style_p, "body_area": tuple(args.body_area)})
    result: dict[str, Any] = {"run": run_record("cpu"), "data": data.model_dump(mode="json"),
                              "rib": {k: v.model_dump(mode="json", include={"iterations", "lr", "lr_rule", "step_gain",
                                                                            "companions", "crop_size", "resize_long",
                                                                            "pooling"})
                                      for k, v in SETTINGS.items()},
                              "images": args.images, "irn": args.irn, "seeds": list(zip(args.seeds, train_seeds,
                                                                                          strict=True))}
    per_seed: list[dict[str, Any]] = []
    for data_seed, train_seed in zip(args.seeds, train_seeds, strict=True):
        per_seed.append(run_seed(args.work / f"seed_{data_seed}_{train_seed}", data_seed, train_seed, data,
                                 args.images, args.cam_only, args.irn))
        result.update(seeds_done=len(per_seed), per_seed=per_seed, **summary(per_seed))
        text = json.dumps(result, indent=1, default=float)
        if args.out:
            args.out.write_text(text + "\n")
    if not args.out:
        print(text)


if __name__ == "__main__":
    main()
