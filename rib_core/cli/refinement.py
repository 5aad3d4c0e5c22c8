"""``rib`` commands after the maps (paper section 3.3): score and refine them, export the masks, and
the study and tuning that compare the stages."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rib_core.cli.options import AddCommand, build_config, device_of, with_config, with_device
from rib_core.data.datasets import ManifestError
from rib_core.io.exports import EXPORT_FORMATS


def cmd_eval(args: argparse.Namespace) -> None:
    from rib_core.classifier.cam import LocalizationMap
    from rib_core.config.stage_configs import EvalConfig
    from rib_core.data.datasets import load_manifest, load_mask
    from rib_core.data.evaluation import sweep_seeds, write_report

    manifest = load_manifest(args.manifest)
    maps = Path(args.maps)
    records = [r for r in manifest.records if r.mask is not None and (maps / f"{r.id}.npz").exists()]
    if not records:
        raise ManifestError([(0, f"no image of {args.manifest} has both a mask and a map in {maps}")])
    pairs = ((LocalizationMap.load(maps / f"{r.id}.npz"), load_mask(manifest.mask_uri(r))) for r in records)
    report = sweep_seeds(pairs, len(manifest.classes), build_config(EvalConfig, args), manifest.classes)
    if args.report:
        write_report(report, args.report)
    b = report["best"]
    print(f"{report['images']} images: best threshold {report['best_threshold']:.2f} mIoU {100 * b['miou']:.1f} "
          f"precision {100 * b['precision']:.1f} recall {100 * b['recall']:.1f} F1 {100 * b['f1']:.1f}")


def cmd_refine(args: argparse.Namespace) -> None:
    from rib_core.config.stage_configs import RefineConfig
    from rib_core.refine.pseudo_masks import refine_maps

    report = refine_maps(args.maps, args.manifest, args.out, build_config(RefineConfig, args), args.irn,
                         args.saliency, device_of(args), not args.quiet, classifier=args.classifier)
    for key in ("seeds_crf", "ir_labels", "masks"):
        if key in report:
            print(f"{key:<10} mIoU {100 * report[key]['miou']:.1f}")
    print(Path(args.out) / "report.json")


def cmd_export(args: argparse.Namespace) -> None:
    from rib_core.io.export_sources import job_masks, results_masks
    from rib_core.io.exports import ExportConfig, write_export

    cfg = ExportConfig(format=args.format, image_url_prefix=args.image_url_prefix, images=not args.no_images)
    if args.classes:  # a service job's folder: its class list is the service's companion manifest's
        from rib_core.data.datasets import load_manifest
        from rib_core.io.storage import is_s3_uri, open_storage

        if not is_s3_uri(args.results) and not Path(args.results, "images").is_dir():
            raise FileNotFoundError(f"{args.results} is no job folder (no images/ in it)")
        classes = load_manifest(args.classes, verify_files=False).classes
        storage = open_storage(args.results)
        # request.json (rib_core.io.artifacts' layout) names the images; a job without one exports without them
        request = json.loads(storage.get("request.json")) if storage.exists("request.json") else {"items": []}
        images = job_masks(storage, "", {it["id"]: it["image"] for it in request["items"]})
        if not images:
            raise ValueError(f"no finished image in {args.results} (images/<id>/meta.json)")
    else:
        classes, images = results_masks(args.results, args.masks, args.maps)
    files = write_export(images, classes, cfg, args.out)
    print(f"{len(images)} images, {len(classes)} classes -> {args.format}: {len(files)} files in {args.out}")


def cmd_study(args: argparse.Namespace) -> None:
    from rib_core.experiments.study import StudyConfig, run_study

    summary = run_study(args.out, build_config(StudyConfig, args), device_of(args), not args.quiet)
    print((Path(args.out) / "study.md").read_text(), end="")
    print(f"{len(summary['seeds'])} seeds: {Path(args.out) / 'study.json'}")


def cmd_tune(args: argparse.Namespace) -> None:
    from rib_core.experiments.tune import tune
    from rib_core.experiments.tune_config import TuneConfig

    report = tune(args.classifier, args.manifest, args.out, build_config(TuneConfig, args), args.companions,
                  args.score_on, device_of(args), not args.quiet)
    if report.get("sizes"):
        print(report["sizes"], file=sys.stderr)
    for row in report["rib_sweep"]:
        print(f"{row['setting']:<28} seed mIoU {100 * row['seed_miou']:5.1f} (threshold {row['seed_threshold']:.2f})")
    for row in report.get("mask_sweep", []):
        print(f"{row['setting']:<28} labels {row['fg_threshold']:.2f}/{row['bg_threshold']:.2f}: mask mIoU "
              f"{100 * row['mask_miou']:5.1f} ({100 * row['labels_ignored_fraction']:.0f}% of pixels unlabelled)")
    print(f"chosen by the {report['chosen_by']}: {report['chosen']}, seed threshold {report['seed_threshold']:.2f}"
          + (f", confident labels {report['labels']['fg_threshold']:.2f}/{report['labels']['bg_threshold']:.2f}, "
             f"walk 2^{report['walk_exp_times']} steps, background {report['walk_bg_threshold']:.2f}"
             if "labels" in report else ""))
    if "held_out" in report:
        held = report["held_out"]
        print(f"held-out ({held['images']} images) seed mIoU: default {100 * held['default']['seed_miou']:.1f}, "
              f"tuned {100 * held['tuned']['seed_miou']:.1f}"
              + (f"; IRN mask mIoU: default {100 * held['default']['mask_miou']:.1f}, "
                 f"tuned {100 * held['tuned']['mask_miou']:.1f}" if "mask_gain" in held else ""))
    print(f"settings: {Path(args.out) / 'rib.json'} (rib rib --config), {Path(args.out) / 'refine.json'} "
          "(rib refine --config)")


def refinement_commands(add: AddCommand) -> None:
    """Maps scored and refined; the study and the tuning that compare the stages."""
    p = with_config(add("eval", cmd_eval, "seed mIoU / P / R / F1 of a maps folder over a threshold sweep"))
    p.add_argument("maps")
    p.add_argument("manifest")
    p.add_argument("--report", help="write the JSON report here")
    p = with_device(with_config(add("refine", cmd_refine, "maps + manifest -> CRF and IRN pseudo-masks and a report")))
    p.add_argument("maps")
    p.add_argument("manifest")
    p.add_argument("out")
    p.add_argument("--irn", help="trained IRN checkpoint (default: train IRN on these maps)")
    p.add_argument("--classifier", help="the classifier checkpoint the maps came from: IRN's frozen backbone "
                   "when irn.init_weights is not set (training IRN needs one of the two)")
    p.add_argument("--saliency", help="folder of <id>.png saliency maps (RIB-Sal)")
    p = add("export", cmd_export, "pseudo-masks to COCO (scored RLE annotations + images), Label Studio (tasks "
            "with scored brush predictions + labelling config) or VOC (palette PNGs, images, labelmap.txt)")
    p.add_argument("results", help="a rib refine output folder (its masks.jsonl), a manifest with masks, or, "
                   "with --classes, a service job's folder (local or s3://.../jobs/<id>)")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--masks", default="masks", help="mask folder of a rib refine output: masks (final, default), "
                   "crf (seed + CRF), retrain_labels, ...")
    p.add_argument("--classes", help="manifest whose class list a service job used (the companion manifest)")
    p.add_argument("--maps", help="the maps folder (<id>.npz) the masks came from: each region's score is the "
                   "map's mean inside it (default: a service job's own maps; without maps every score is 1)")
    p.add_argument("--no-images", action="store_true", help="COCO and VOC: leave the images out (annotations "
                   "and masks only)")
    p.add_argument("--image-url-prefix", help="Label Studio: a task's image URL is this + the image's file name, "
                   "e.g. '/data/local-files/?d=images/' (default: the image's path or URI)")
    p = with_device(with_config(add("study", cmd_study, "every stage's gain over several seeds on the demo data: "
                                 "classifier, CAM, RIB-GAP/GNDRP, CRF, IRN, DeepLab vs full supervision")))
    p.add_argument("--out", default="runs/study", help="output folder (default runs/study); reruns resume")
    p = with_device(with_config(add("tune", cmd_tune, "choose RIB's step size x iterations x pooling, IRN's "
                                    "confident-label thresholds and the walk by the final pseudo-mask on a small "
                                    "labelled subset")))
    p.add_argument("classifier", help="checkpoint path or s3:// URI")
    p.add_argument("manifest", help="the tuning subset: tens of images, each with a ground-truth mask")
    p.add_argument("out", help="folder for rib.json, refine.json and tune_report.json")
    p.add_argument("--companions", help="manifest of the companion pool (default: the tuning manifest)")
    p.add_argument("--score-on", help="other images with masks: score the choice there against the defaults")
