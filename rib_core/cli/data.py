"""``rib`` commands that bring data in: the demo and its data set, the VOC and COCO importers."""

from __future__ import annotations

import argparse
from pathlib import Path

from rib_core.cli.options import AddCommand, build_config, device_of, with_config, with_device


def cmd_demo(args: argparse.Namespace) -> None:
    from rib_core.experiments.demo_job import DemoJobConfig, run_demo

    summary = run_demo(args.out, build_config(DemoJobConfig, args), device_of(args), not args.quiet)
    print(summary["classifier"]["summary"])
    if summary["classifier"]["warning"]:
        print(f"warning: {summary['classifier']['warning']}")
    for m in summary["metrics"]:
        print(f"{m['method']:<24} mIoU {100 * m['miou']:5.1f}")
    print(f"report: {Path(args.out) / 'report.html'}")


def cmd_demo_data(args: argparse.Namespace) -> None:
    from rib_core.data.demo_data import DemoDataConfig, make_demo_dataset

    d = make_demo_dataset(args.out, build_config(DemoDataConfig, args))
    print(f"{len(d.train)} train and {len(d.val)} val images: {d.root / 'train.jsonl'}, {d.root / 'val.jsonl'}")


def cmd_import_voc(args: argparse.Namespace) -> None:
    from rib_core.data.importers import import_voc

    m = import_voc(args.devkit, args.ids, args.out, args.cls_labels)
    print(f"{len(m)} images -> {args.out}")


def cmd_import_coco(args: argparse.Namespace) -> None:
    from rib_core.data.importers import import_coco

    m = import_coco(args.images, args.annotations, args.out, args.masks_dir)
    print(f"{len(m)} images -> {args.out}")


def data_commands(add: AddCommand) -> None:
    """The demo and the importers: data in, manifests out."""
    p = with_device(with_config(add("demo", cmd_demo, "the main job on the demo data: classifier, CAM, RIB, "
                                 "refinement, report.html (local files, no broker or S3)")))
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); reruns resume")
    p = with_config(add("demo-data", cmd_demo_data, "write the MNIST-scenes demo dataset (train/val manifests)"))
    p.add_argument("out")
    p = add("import-voc", cmd_import_voc, "manifest from a PASCAL VOC 2012 devkit (+ SBD lists)")
    p.add_argument("--devkit", required=True, help="the VOC2012 folder (JPEGImages, Annotations, ...)")
    p.add_argument("--ids", required=True, help="id list, e.g. IRN's voc12/train_aug.txt")
    p.add_argument("--cls-labels", help="IRN's cls_labels.npy instead of the Annotations XML (trusted files only)")
    p.add_argument("--out", required=True)
    p = add("import-coco", cmd_import_coco, "manifest from COCO 2014 instances annotations")
    p.add_argument("--images", required=True)
    p.add_argument("--annotations", required=True)
    p.add_argument("--masks-dir", help="render ground-truth masks here")
    p.add_argument("--out", required=True)
