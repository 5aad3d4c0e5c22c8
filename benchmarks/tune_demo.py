"""``rib tune`` on the demo: settings chosen by the final pseudo-mask on training images the demo
does not score, then scored on the ones it does (seeds and final masks, against the demo's own
settings: the paper's lr 8e-6 and RIB's confident-label thresholds 0.35 / 0.17).

After ``rib demo --out runs/demo``, the demo scores its first ``n_images`` (24) training scenes.
This tunes on the next 24 (tuning subset) and scores the choice on the first 24 (held out), with
the demo's classifier, the training scenes as the companion pool, and the demo's settings as the
starting point (so ``held_out.default`` is the demo as configured):

    python -m benchmarks.tune_demo --demo runs/demo --out runs/tune

Writes the two manifests next to the demo's data (``tune.jsonl``, ``scored.jsonl``), and ``rib
tune``'s ``rib.json``, ``refine.json`` and ``tune_report.json`` under ``--out``; prints the sweep
and the held-out comparison.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rib_core.data.datasets import load_manifest
from rib_core.experiments.demo_job import DemoJobConfig
from rib_core.experiments.tune import tune
from rib_core.experiments.tune_config import TuneConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="runs/demo", help="a finished rib demo folder")
    p.add_argument("--out", default="runs/tune")
    p.add_argument("--lrs", nargs="+", type=float, default=[3e-5, 1e-4, 3e-4, 1e-3],
                   help="RIB learning rates swept besides the demo's (the paper's 8e-6)")
    p.add_argument("--gains", nargs="*", type=float, default=TuneConfig.model_fields["step_gains"].default_factory(),
                   help="step_gain values of the first_step rule swept as well (none: fixed lrs only)")
    args = p.parse_args()
    demo_dir, demo = Path(args.demo), DemoJobConfig()
    train = load_manifest(demo_dir / "data" / "train.jsonl")
    ids, n = [r.id for r in train.records], demo.n_images
    tuning, scored = train.subset(ids[n:2 * n]), train.subset(ids[:n])
    tuning.save(demo_dir / "data" / "tune.jsonl")
    scored.save(demo_dir / "data" / "scored.jsonl")
    cfg = TuneConfig(rib=demo.rib, refine=demo.refine, lrs=args.lrs, step_gains=args.gains)
    report = tune(str(demo_dir / "classifier" / "classifier.pth"), tuning, args.out, cfg, companions=train,
                  score_on=scored, progress=False)
    for row in report["rib_sweep"]:
        print(f"{row['setting']:<24} tuning seed mIoU {100 * row['seed_miou']:.1f} at {row['seed_threshold']:.2f}")
    for row in report["mask_sweep"]:
        print(f"{row['setting']:<24} labels {row['fg_threshold']}/{row['bg_threshold']}: tuning mask mIoU "
              f"{100 * row['mask_miou']:.1f}")
    print(f"chosen {report['chosen']}, labels {report['labels']}, walk: 2^{report['walk_exp_times']} steps, "
          f"background {report['walk_bg_threshold']:.2f}")
    print(json.dumps(report["held_out"], indent=1))


if __name__ == "__main__":
    main()
