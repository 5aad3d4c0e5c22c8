"""IRN mask quality against IRN's training length and the walk's length, on the demo's tuning subset.

After ``rib demo`` and ``python -m benchmarks.tune_scenes`` (which writes ``tune.jsonl`` and the
tuning subset's maps at the paper's lr under ``runs/tune/rib/gndrp_lr8e-06_k10``), this trains IRN
for each number of epochs on those maps' confident labels (the demo's IRN settings otherwise) and
scores the random walk's masks at a few lengths and background scores:

    python -m benchmarks.irn_steps --epochs 3 30 100

Only the tuning subset is used: the demo's scored images take no part.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rib_core.config.stage_configs import RandomWalkConfig
from rib_core.data.datasets import load_manifest
from rib_core.experiments.demo_job import starting_refine
from rib_core.experiments.tune import walk_curve
from rib_core.refine.irn import load_irn
from rib_core.refine.pseudo_masks import refine_maps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="runs/demo")
    p.add_argument("--maps", default="runs/tune/rib/gndrp_lr8e-06_k10")
    p.add_argument("--out", default="runs/irn_steps")
    p.add_argument("--epochs", nargs="+", type=int, default=[3, 30, 100])
    p.add_argument("--exp-times", nargs="+", type=int, default=[2, 4, 8])
    p.add_argument("--thresholds", nargs="+", type=float, default=[0.27, 0.5, 0.7])
    args = p.parse_args()
    tuning = load_manifest(Path(args.demo) / "data" / "tune.jsonl")
    base = starting_refine().model_copy(update={"walk": RandomWalkConfig()})
    print("| IRN epochs (steps) | train s | " + " | ".join(
        f"2^{e}, {t:.2f}" for e in args.exp_times for t in args.thresholds) + " |")
    for epochs in args.epochs:
        cfg = base.model_copy(update={"irn": base.irn.model_copy(update={"epochs": epochs})})
        started = time.perf_counter()
        report = refine_maps(args.maps, tuning, Path(args.out) / f"epochs_{epochs}", cfg, device="cpu",
                             progress=False, classifier=str(Path(args.demo) / "classifier" / "classifier.pth"))
        seconds = time.perf_counter() - started
        curve = walk_curve(report["irn_checkpoint"], Path(args.maps), tuning, cfg, args.thresholds, args.exp_times,
                           "cpu")
        steps = load_irn(report["irn_checkpoint"])[1].get("steps")
        print(f"| {epochs} ({steps}) | {seconds:.0f} | "
              + " | ".join(f"{100 * curve[e, t, False]:.1f}" for e in args.exp_times for t in args.thresholds) + " |")


if __name__ == "__main__":
    main()
