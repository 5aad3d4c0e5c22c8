"""``rib tune`` on the demo's scenes or the part scenes: settings chosen by the final pseudo-mask on
training images that are not scored, then scored on others (seeds and final masks, against the
starting settings: the paper's lr 8e-6 and RIB's confident-label thresholds 0.35 / 0.17).

``--work`` holds the scenes and a classifier trained on them with the recipe and seed the demo
(``--scenes demo``) or the study's part scenes (``--scenes parts``, ``study_at_size``) use; both
are made when missing (a ``rib demo --out runs/demo`` folder serves for the demo's scenes). This
tunes on training scenes ``n..2n`` (the tuning subset; n = 24, the demo's ``n_images``) and scores
the choice on scenes ``0..n`` (held out), the training scenes as the companion pool:

    python -m benchmarks.tune_scenes --scenes demo --work runs/demo --out runs/tune
    python -m benchmarks.tune_scenes --scenes parts --work runs/tune_parts_work --out runs/tune_parts

Writes the two manifests next to the scenes (``tune.jsonl``, ``scored.jsonl``), and ``rib tune``'s
``rib.json``, ``refine.json`` and ``tune_report.json`` under ``--out``; prints the sweep and the
held-out comparison; ``--record`` also writes the sweep and the held-out rows with the run's
record (date, commit, machine) to a JSON file for ``docs/results``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks import sections
from rib_core.data.datasets import load_manifest
from rib_core.data.part_scenes import PREMISE_SCENES, make_scenes
from rib_core.experiments.demo_job import DemoJobConfig, fitted_job, starting_job, train_demo_classifier
from rib_core.experiments.tune import tune
from rib_core.experiments.tune_config import TuneConfig
from rib_core.runtime.provenance import run_record


def scenes_job(scenes: str) -> DemoJobConfig:
    """The demo's job before rib tune's choice (its starting settings), or the study's job on the part
    scenes (``study.StudyConfig.job``)."""
    return starting_job() if scenes == "demo" else fitted_job(starting_job(), PREMISE_SCENES)


def prepared(work: Path, job: DemoJobConfig, device: str) -> Path:
    """``work``'s classifier checkpoint, after making the scenes and training it where missing."""
    data = work / "data"
    if not (data / "val.jsonl").exists():
        make_scenes(data, job.data)
    train_demo_classifier(work, job, load_manifest(data / "train.jsonl"), data / "val.jsonl", device, progress=False)
    return work / "classifier" / "classifier.pth"


HOWTO = ("`OMP_NUM_THREADS=1 python -m benchmarks.tune_scenes --scenes {scenes} --work runs/tune_{scenes}_work "
         "--out runs/tune_{scenes} --lrs 8e-6 --gains 0.3 --record docs/results/tune_{scenes}.json`")
SCENE_NAMES = {"demo": "demo's scenes", "parts": "part scenes"}


def section(scenes: str, result: dict[str, Any] | None) -> str:
    """docs/RESULTS.md's section for one recipe: the sweep on the tuning subset, the choice, and the
    choice against the starting settings on the held-out scenes."""
    return sections.section(f"## `rib tune` by the final mask on the {SCENE_NAMES[scenes]} "
                            f"(`benchmarks/tune_scenes.py`, `docs/results/tune_{scenes}.json`)",
                            result, HOWTO.format(scenes=scenes), _paragraphs)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _walk(row: dict[str, Any]) -> str:
    """A row's walk: 2^k steps, background score, and "+ CRF" where its mask went through the CRF."""
    return f"2^{row['walk_exp_times']}, {row['walk_bg_threshold']:.2f}{' + CRF' if row.get('walk_crf') else ''}"


def _paragraphs(result: dict[str, Any]) -> list[str]:
    held = result["held_out"]
    intro = (f"Chosen on {result['tuning_images']} training scenes (the tuning subset), scored on "
             f"{held['images']} others that took no part in the choice; one classifier (the recipe's seed). "
             "Per RIB setting and pair of confident-label thresholds, IRN is trained on the tuning subset's "
             "labels and the walk's length and background score are swept, its mask with and without a dense CRF "
             "after it (walk: 2^k steps, background score, + CRF); the best final mask wins. mIoU in %.")
    sweep = ["| RIB setting | labels fg / bg | unlabelled % | labels mIoU | seed + CRF | IRN mask | walk | "
             "IRN mask, best walk without the CRF |", "|---|---|---|---|---|---|---|---|"]
    sweep += [f"| {m['setting']} | {m['fg_threshold']:g} / {m['bg_threshold']:g} | "
              f"{_pct(m['labels_ignored_fraction'])} | {_pct(m['labels_miou'])} | {_pct(m['seed_crf_miou'])} | "
              f"{_pct(m['mask_miou'])} | {_walk(m)} | {_pct(m['mask_miou_without_crf'])} |"
              for m in result["mask_sweep"]]
    seeds = ", ".join(f"{r['setting']} {_pct(r['seed_miou'])} (threshold {r['seed_threshold']:.2f})"
                      for r in result["rib_sweep"])
    chosen = (f"Seeds on the tuning subset: {seeds}. Chosen: {result['chosen']}, labels "
              f"{result['labels']['fg_threshold']:g} / {result['labels']['bg_threshold']:g}, walk {_walk(result)}.")
    rows = ["| held-out scenes | RIB setting | seed | seed + CRF | IRN mask | IRN − seed + CRF | walk |",
            "|---|---|---|---|---|---|---|"]
    rows += [f"| {label} | {h['setting']} | {_pct(h['seed_miou'])} | {_pct(h['seed_crf_miou'])} | "
             f"{_pct(h['mask_miou'])} | {100 * h['mask_minus_seed_crf']:+.1f} | {_walk(h)} |"
             for label, h in (("starting settings", held["default"]), ("tuned", held["tuned"]))]
    gains = (f"Tuned − starting on the held-out scenes: seed {100 * held['gain']:+.1f} points, IRN mask "
             f"{100 * held['mask_gain']:+.1f} points.")
    return [intro, sections.provenance(result), "\n".join(sweep), chosen, "\n".join(rows), gains]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", choices=("demo", "parts"), default="demo")
    p.add_argument("--work", default="runs/demo", help="the scenes and their classifier (made when missing)")
    p.add_argument("--out", default="runs/tune")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lrs", nargs="+", type=float, default=[3e-5, 1e-4, 3e-4, 1e-3],
                   help="RIB learning rates swept besides the starting one (the paper's 8e-6)")
    p.add_argument("--gains", nargs="*", type=float, default=TuneConfig.model_fields["step_gains"].default_factory(),
                   help="step_gain values of the first_step rule swept as well (none: fixed lrs only)")
    p.add_argument("--record", type=Path, help="also write the sweeps and held-out rows here, with the run's record")
    args = p.parse_args()
    work, job = Path(args.work), scenes_job(args.scenes)
    run = run_record(args.device)  # at the start: the code that ran
    checkpoint = prepared(work, job, args.device)
    train = load_manifest(work / "data" / "train.jsonl")
    ids, n = [r.id for r in train.records], job.n_images
    tuning, scored = train.subset(ids[n:2 * n]), train.subset(ids[:n])
    tuning.save(work / "data" / "tune.jsonl")
    scored.save(work / "data" / "scored.jsonl")
    cfg = TuneConfig(rib=job.rib, refine=job.refine, lrs=args.lrs, step_gains=args.gains)
    report = tune(str(checkpoint), tuning, args.out, cfg, companions=train, score_on=scored, device=args.device,
                  progress=False)
    for row in report["rib_sweep"]:
        print(f"{row['setting']:<24} tuning seed mIoU {100 * row['seed_miou']:.1f} at {row['seed_threshold']:.2f}")
    for row in report["mask_sweep"]:
        print(f"{row['setting']:<24} labels {row['fg_threshold']}/{row['bg_threshold']}: tuning mask mIoU "
              f"{100 * row['mask_miou']:.1f}")
    print(f"chosen {report['chosen']}, labels {report['labels']}, walk {_walk(report)}")
    print(json.dumps(report["held_out"], indent=1))
    if args.record:
        kept = ("tuning_images", "sizes", "chosen_by", "chosen", "seed_threshold", "labels", "walk_exp_times",
                "walk_bg_threshold", "walk_crf", "held_out", "config")
        sweeps = {"rib_sweep": [{k: v for k, v in row.items() if k != "maps"} for row in report["rib_sweep"]],
                  "mask_sweep": [{k: v for k, v in row.items() if k != "irn_checkpoint"}
                                 for row in report["mask_sweep"]]}
        args.record.write_text(json.dumps({"run": run, "scenes": args.scenes, **{k: report[k] for k in kept},
                                           **sweeps}, indent=2))


if __name__ == "__main__":
    main()
