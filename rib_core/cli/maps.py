"""``rib`` commands of the classifier and its maps (paper sections 3.1-3.2): train and score the
classifier, CAM, RIB, and the pooling comparison."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rib_core.cli.options import AddCommand, build_config, device_of, with_config, with_device


def cmd_train_classifier(args: argparse.Namespace) -> None:
    from rib_core.classifier.train import ClassifierTrainConfig, train_classifier
    from rib_core.data.datasets import load_manifest

    path = train_classifier(load_manifest(args.manifest), args.out, build_config(ClassifierTrainConfig, args),
                            device_of(args), resume=not args.restart, progress=not args.quiet, val_manifest=args.val)
    print(path)
    if path.name == "classifier.pth":
        _print_classifier_quality(str(path))


def _print_classifier_quality(uri: str, extra: dict[str, Any] | None = None) -> None:
    """Which classifier a stage starts from and its recorded validation mAP; a warning when weak."""
    from rib_core.classifier.evaluate import classifier_quality

    quality = classifier_quality(uri if extra is None else extra, checkpoint=uri)
    print(quality["summary"], file=sys.stderr)
    if quality["warning"]:
        print(f"warning: {quality['warning']}", file=sys.stderr)


def cmd_eval_classifier(args: argparse.Namespace) -> None:
    from rib_core.classifier.evaluate import classifier_quality, evaluate_classifier
    from rib_core.data.datasets import load_manifest
    from rib_core.training.checkpoints import load_classifier

    manifest = load_manifest(args.manifest)
    model, _, extra = load_classifier(args.classifier, manifest.classes)
    report = {"checkpoint": args.classifier, "manifest": args.manifest,
              **evaluate_classifier(model.to(device_of(args)), manifest, device_of(args)),
              "recorded": classifier_quality(extra, checkpoint=args.classifier)}
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
    print(f"{report['images']} images: mAP {100 * report['map']:.1f}  F1 {100 * report['f1']:.1f} (at sigmoid 0.5)  "
          f"loss {report['loss']:.4f}")
    for name, ap in report["ap"].items():
        f1 = report["f1_per_class"][name]
        print(f"  {name:<16} AP {'-' if ap is None else f'{100 * ap:5.1f}'}  "
              f"F1 {'-' if f1 is None else f'{100 * f1:5.1f}'}")
    print(report["recorded"]["summary"])


def _classifier_and_manifest(args: argparse.Namespace) -> tuple[Any, Any]:
    from rib_core.data.datasets import load_manifest
    from rib_core.training.checkpoints import load_classifier

    manifest = load_manifest(args.manifest)
    model, _, extra = load_classifier(args.classifier, manifest.classes)
    _print_classifier_quality(args.classifier, extra)
    return model, manifest


def cmd_cam(args: argparse.Namespace) -> None:
    from rib_core.classifier.cam import CamConfig, run_cam

    model, manifest = _classifier_and_manifest(args)
    print(run_cam(model, manifest, args.out, build_config(CamConfig, args), device_of(args), not args.quiet))


def cmd_rib(args: argparse.Namespace) -> None:
    from rib_core.config.rib_config import RibConfig
    from rib_core.data.datasets import load_manifest, median_long_side
    from rib_core.rib.batching import run_rib
    from rib_core.rib.companions import CompanionPool

    model, manifest = _classifier_and_manifest(args)
    companions = load_manifest(args.companions) if args.companions else manifest
    cfg, note = build_config(RibConfig, args).fitted_to(median_long_side(companions))
    if note:
        print(note, file=sys.stderr)
    pool = CompanionPool.from_manifest(companions)
    print(run_rib(model, manifest, pool, args.out, cfg, device_of(args), not args.quiet))


def cmd_compare_pooling(args: argparse.Namespace) -> None:
    from rib_core.experiments.seed_quality import SeedQualityConfig, compare_pooling

    report = compare_pooling(args.classifier, args.manifest, args.out, build_config(SeedQualityConfig, args),
                             device_of(args), not args.quiet)
    if report["sizes"]:
        print(report["sizes"], file=sys.stderr)
    for row in report["rows"]:
        print(f"{row['method']:<22} seed mIoU {100 * row['miou']:.1f} (threshold {row['threshold']:.2f})")


def classifier_and_map_commands(add: AddCommand) -> None:
    """The classifier, then its maps: CAM, RIB, pooling compared."""
    p = with_device(with_config(add("train-classifier", cmd_train_classifier, "train the initial classifier "
                                 "(IRN train_cam recipe; --set recipe=scratch without ImageNet weights)")))
    p.add_argument("manifest")
    p.add_argument("out")
    p.add_argument("--restart", action="store_true", help="ignore a saved training state")
    p.add_argument("--val", help="validation manifest: loss, mAP, per-class AP and F1 after every epoch "
                   "(OUT/train_report.json), recorded in the checkpoint")
    p = with_device(add("eval-classifier", cmd_eval_classifier, "mAP, per-class AP and F1 (sigmoid 0.5) of a "
                    "classifier on a labelled manifest (ours or IRN's res50_cam.pth)"))
    p.add_argument("classifier", help="checkpoint path or s3:// URI")
    p.add_argument("manifest")
    p.add_argument("--report", help="write the JSON report here")
    for name, fn, help_ in (("cam", cmd_cam, "multi-scale CAMs (<id>.npz per image)"),
                            ("rib", cmd_rib, "RIB maps M (<id>.npz per image)"),
                            ("compare-pooling", cmd_compare_pooling,
                             "seed quality of CAM vs RIB-GAP vs RIB-GNDRP (paper Table 5c)")):
        p = with_device(with_config(add(name, fn, help_)))
        p.add_argument("classifier", help="checkpoint path or s3:// URI (ours or IRN's res50_cam.pth)")
        p.add_argument("manifest")
        p.add_argument("out")
        if name == "rib":
            p.add_argument("--companions", help="manifest of the companion pool (default: the same manifest)")
