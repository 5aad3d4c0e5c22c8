"""``rib``: every stage from the command line.

Exit codes scripts can rely on: 0 success, 2 bad usage (argparse), 3 bad input (a manifest,
checkpoint, image or config that cannot be used; the message says what to fix), 1 anything else.
Stage settings come from the stage's config object: ``--config file.json`` and/or ``--set
key=value`` (dotted keys for nested settings, JSON values), e.g. ``--set iterations=5 --set
pooling=gap``. Torch computes with ``RIB_TORCH_THREADS`` threads (default: ``OMP_NUM_THREADS``
if set, else every core this process may use, ``os.sched_getaffinity``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from rib_core.data.datasets import ImageError, ManifestError
from rib_core.io.exports import EXPORT_FORMATS
from rib_core.training.checkpoints import CheckpointError

EXIT_INPUT = 3
C = TypeVar("C", bound=BaseModel)
# add(name, handler, help): a subcommand of ``rib``, returned for its arguments.
AddCommand = Callable[[str, Callable[[argparse.Namespace], None], str], argparse.ArgumentParser]


def build_config(cls: type[C], args: argparse.Namespace, base: dict[str, Any] | None = None) -> C:
    """The stage config from ``base``, then ``--config``, then ``--set`` overrides."""
    from rib_core.config.presets import merge

    data = merge(base or {}, json.loads(Path(args.config).read_text()) if args.config else {})
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cls.model_validate(data)


def _with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", help="JSON file with the stage's settings")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting (repeatable)")
    return p


def _device(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _dev(args: argparse.Namespace) -> str:
    from rib_core.jobs.pipeline import resolve_device

    return str(resolve_device(args.device))


def cmd_demo(args: argparse.Namespace) -> None:
    from rib_core.experiments.demo_job import DemoJobConfig, run_demo

    summary = run_demo(args.out, build_config(DemoJobConfig, args), _dev(args), not args.quiet)
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


def cmd_train_classifier(args: argparse.Namespace) -> None:
    from rib_core.classifier.train import ClassifierTrainConfig, train_classifier
    from rib_core.data.datasets import load_manifest

    path = train_classifier(load_manifest(args.manifest), args.out, build_config(ClassifierTrainConfig, args),
                            _dev(args), resume=not args.restart, progress=not args.quiet, val_manifest=args.val)
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
              **evaluate_classifier(model.to(_dev(args)), manifest, _dev(args)),
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
    print(run_cam(model, manifest, args.out, build_config(CamConfig, args), _dev(args), not args.quiet))


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
    print(run_rib(model, manifest, pool, args.out, cfg, _dev(args), not args.quiet))


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
                         args.saliency, _dev(args), not args.quiet, classifier=args.classifier)
    for key in ("seeds_crf", "ir_labels", "masks"):
        if key in report:
            print(f"{key:<10} mIoU {100 * report[key]['miou']:.1f}")
    print(Path(args.out) / "report.json")


def cmd_export(args: argparse.Namespace) -> None:
    from rib_core.io.exports import ExportConfig, job_masks, results_masks, write_export

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


def cmd_toy(args: argparse.Namespace) -> None:
    from rib_core.experiments.toy import ToyConfig, run_toy_experiment

    result = run_toy_experiment(args.out, build_config(ToyConfig, args))
    print(json.dumps(result.get("trends", {}), indent=2))


def cmd_compare_pooling(args: argparse.Namespace) -> None:
    from rib_core.experiments.seed_quality import SeedQualityConfig, compare_pooling

    report = compare_pooling(args.classifier, args.manifest, args.out, build_config(SeedQualityConfig, args),
                             _dev(args), not args.quiet)
    if report["sizes"]:
        print(report["sizes"], file=sys.stderr)
    for row in report["rows"]:
        print(f"{row['method']:<22} seed mIoU {100 * row['miou']:.1f} (threshold {row['threshold']:.2f})")


def cmd_tune(args: argparse.Namespace) -> None:
    from rib_core.experiments.tune import TuneConfig, tune

    report = tune(args.classifier, args.manifest, args.out, build_config(TuneConfig, args), args.companions,
                  args.score_on, _dev(args), not args.quiet)
    if report.get("sizes"):
        print(report["sizes"], file=sys.stderr)
    for row in report["rib_sweep"]:
        print(f"{row['setting']:<28} seed mIoU {100 * row['seed_miou']:5.1f} (threshold {row['seed_threshold']:.2f})")
    print(f"chosen: {report['chosen']}, seed threshold {report['seed_threshold']:.2f}"
          + (f", walk 2^{report['walk_exp_times']} steps, background {report['walk_bg_threshold']:.2f}"
             if "walk_bg_threshold" in report else ""))
    if "held_out" in report:
        held = report["held_out"]
        print(f"held-out ({held['images']} images) seed mIoU: default {100 * held['default']['seed_miou']:.1f}, "
              f"tuned {100 * held['tuned']['seed_miou']:.1f}"
              + (f"; IRN mask mIoU: default {100 * held['default']['mask_miou']:.1f}, "
                 f"tuned {100 * held['tuned']['mask_miou']:.1f}" if "mask_gain" in held else ""))
    print(f"settings: {Path(args.out) / 'rib.json'} (rib rib --config), {Path(args.out) / 'refine.json'} "
          "(rib refine --config)")


def cmd_study(args: argparse.Namespace) -> None:
    from rib_core.experiments.study import StudyConfig, run_study

    summary = run_study(args.out, build_config(StudyConfig, args), _dev(args), not args.quiet)
    print((Path(args.out) / "study.md").read_text(), end="")
    print(f"{len(summary['seeds'])} seeds: {Path(args.out) / 'study.json'}")


def cmd_deeplab(args: argparse.Namespace) -> None:
    from rib_core.config.stage_configs import DeepLabTrainConfig
    from rib_core.deeplab.job import run_training_job

    spec = {"kind": args.action, "manifest": args.manifest, "output": args.out,
            "config": build_config(DeepLabTrainConfig, args).model_dump(), "checkpoint": args.checkpoint,
            "evaluate_on": args.evaluate_on, "device": _dev(args), "progress": not args.quiet}
    summary = run_training_job({k: v for k, v in spec.items() if v is not None})
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2, default=str))


def cmd_reproduce(args: argparse.Namespace) -> None:
    from rib_core.config.presets import merge
    from rib_core.experiments.reproduce import SMOKE, DataInputs, ReproduceConfig, run_reproduce

    weights = str(Path(args.weights).resolve())
    deeplab = {"arch": "resnet101", "init_weights": str(Path(args.deeplab_weights).resolve())} \
        if args.deeplab_weights else {"arch": "resnet50", "init_weights": weights}
    base = {"dataset": args.dataset, "classifier": {"init_weights": weights},
            "refine": {"irn": {"init_weights": weights}}, "deeplab": deeplab}
    cfg = build_config(ReproduceConfig, args, merge(base, SMOKE) if args.smoke else base)
    inputs = DataInputs(Path(args.data), Path(args.sbd) if args.sbd else None,
                        Path(args.train_list) if args.train_list else None)
    run_reproduce(args.out, inputs, cfg, _dev(args), not args.quiet, args.stop_after)
    print(f"summary: {Path(args.out) / 'reproduce.json'}")


REPRODUCE_INPUTS = """inputs:
  voc   DATA is the devkit's VOC2012 folder: JPEGImages/, Annotations/ (image labels),
        SegmentationClass/ (VOC's masks: seeds and masks are scored on VOC train, DeepLab on
        val) and ImageSets/Segmentation/{train,val}.txt. The training images are the paper's
        train_aug (10,582): give SBD's folder (benchmark_RELEASE, or its dataset/ folder with
        train.txt and val.txt) with --sbd, or an id list such as IRN's voc12/train_aug.txt with
        --train-list. SegmentationClassAug is not needed.
  coco  DATA holds train2014/ and val2014/ (images) and annotations/instances_train2014.json and
        instances_val2014.json; ground-truth masks are rendered from the polygons.
  --weights  torchvision's ImageNet ResNet-50 state dict (resnet50-*.pth), never downloaded:
        the classifier starts from it and IRN's frozen backbone is it, as in the authors' code.
        DeepLab starts from --deeplab-weights (a torchvision ResNet-101 state dict: the paper's
        DeepLab-v2-ResNet101) or, without it, from --weights with a ResNet-50 backbone.

stages (each skipped when OUT/stages/<stage>.json exists; a killed stage continues):
  data, classifier, cam, maps, seeds, refine, deeplab. After each, the measured figure is
  printed beside the paper's (Tables 1, 2, 4, 5c), with a warning when they differ by more
  than `margin` points (default 2; --set margin=3). Settings: --set rib.lr=1e-5,
  --set refine.walk.exp_times=7, ...; --smoke runs every stage in seconds on 32 training and
  8 val images at 64 px sizes (figures meaningless: it checks the set-up).
"""


def _exec_module(module: str, *args: str) -> None:
    """Replace this process with ``python -m module``: this interpreter, so no PATH is needed."""
    os.execv(sys.executable, [sys.executable, "-m", module, *args])


def cmd_serve(args: argparse.Namespace) -> None:
    _exec_module("uvicorn", "service.main:app", "--host", args.host, "--port", str(args.port))


def cmd_worker(args: argparse.Namespace) -> None:
    _exec_module("worker", *(["--training"] if args.training else []))


def cmd_remote(args: argparse.Namespace) -> None:
    """``rib remote ...`` is ``rib-remote ...`` (rib_client), run in a new process: rib_core never imports
    the client. :func:`main` hands the arguments over before parsing them (they are the client's)."""
    _exec_module("rib_client", *args.remote_args)


def _data_commands(add: AddCommand) -> None:
    """The demo and the importers: data in, manifests out."""
    p = _device(_with_config(add("demo", cmd_demo, "the main job on the demo data: classifier, CAM, RIB, "
                                 "refinement, report.html (local files, no broker or S3)")))
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); reruns resume")
    p = _with_config(add("demo-data", cmd_demo_data, "write the MNIST-scenes demo dataset (train/val manifests)"))
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


def _classifier_and_map_commands(add: AddCommand) -> None:
    """The classifier, then its maps: CAM, RIB, pooling compared."""
    p = _device(_with_config(add("train-classifier", cmd_train_classifier, "train the initial classifier "
                                 "(IRN train_cam recipe; --set recipe=scratch without ImageNet weights)")))
    p.add_argument("manifest")
    p.add_argument("out")
    p.add_argument("--restart", action="store_true", help="ignore a saved training state")
    p.add_argument("--val", help="validation manifest: loss, mAP, per-class AP and F1 after every epoch "
                   "(OUT/train_report.json), recorded in the checkpoint")
    p = _device(add("eval-classifier", cmd_eval_classifier, "mAP, per-class AP and F1 (sigmoid 0.5) of a "
                    "classifier on a labelled manifest (ours or IRN's res50_cam.pth)"))
    p.add_argument("classifier", help="checkpoint path or s3:// URI")
    p.add_argument("manifest")
    p.add_argument("--report", help="write the JSON report here")
    for name, fn, help_ in (("cam", cmd_cam, "multi-scale CAMs (<id>.npz per image)"),
                            ("rib", cmd_rib, "RIB maps M (<id>.npz per image)"),
                            ("compare-pooling", cmd_compare_pooling,
                             "seed quality of CAM vs RIB-GAP vs RIB-GNDRP (paper Table 5c)")):
        p = _device(_with_config(add(name, fn, help_)))
        p.add_argument("classifier", help="checkpoint path or s3:// URI (ours or IRN's res50_cam.pth)")
        p.add_argument("manifest")
        p.add_argument("out")
        if name == "rib":
            p.add_argument("--companions", help="manifest of the companion pool (default: the same manifest)")


def _refinement_commands(add: AddCommand) -> None:
    """Maps scored and refined; the study and the tuning that compare the stages."""
    p = _with_config(add("eval", cmd_eval, "seed mIoU / P / R / F1 of a maps folder over a threshold sweep"))
    p.add_argument("maps")
    p.add_argument("manifest")
    p.add_argument("--report", help="write the JSON report here")
    p = _device(_with_config(add("refine", cmd_refine, "maps + manifest -> CRF and IRN pseudo-masks and a report")))
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
    p = _device(_with_config(add("study", cmd_study, "every stage's gain over several seeds on the demo data: "
                                 "classifier, CAM, RIB-GAP/GNDRP, CRF, IRN, DeepLab vs full supervision")))
    p.add_argument("--out", default="runs/study", help="output folder (default runs/study); reruns resume")
    p = _device(_with_config(add("tune", cmd_tune, "choose RIB's lr x iterations x pooling, the seed threshold "
                                 "and the walk's background threshold on a small labelled subset")))
    p.add_argument("classifier", help="checkpoint path or s3:// URI")
    p.add_argument("manifest", help="the tuning subset: tens of images, each with a ground-truth mask")
    p.add_argument("out", help="folder for rib.json, refine.json and tune_report.json")
    p.add_argument("--companions", help="manifest of the companion pool (default: the tuning manifest)")
    p.add_argument("--score-on", help="other images with masks: score the choice there against the defaults")


def _job_commands(add: AddCommand) -> None:
    """DeepLab, the paper's reproduction, the toy experiment, and the service's processes."""
    p = _device(_with_config(add("reproduce", cmd_reproduce, "the paper's whole chain on PASCAL VOC or MS COCO with "
                                 "the authors' settings, each stage's figure beside the paper's (resumable)")))
    p.formatter_class, p.epilog = argparse.RawDescriptionHelpFormatter, REPRODUCE_INPUTS
    p.add_argument("dataset", choices=["voc", "coco"])
    p.add_argument("data", help="VOC: the VOC2012 devkit folder; COCO: the folder with train2014/, val2014/, "
                   "annotations/")
    p.add_argument("--weights", required=True, help="torchvision ImageNet ResNet-50 state dict file")
    p.add_argument("--deeplab-weights", help="torchvision ImageNet ResNet-101 state dict for DeepLab (the paper's)")
    p.add_argument("--sbd", help="VOC: SBD's folder (its train.txt and val.txt give train_aug)")
    p.add_argument("--train-list", help="VOC: training id list instead of --sbd (e.g. IRN's voc12/train_aug.txt)")
    p.add_argument("--out", required=True, help="output folder; rerunning resumes")
    p.add_argument("--smoke", action="store_true", help="tiny settings: every stage in seconds (checks a set-up)")
    p.add_argument("--stop-after", metavar="STAGE", help="stop after this stage (a later run continues)")
    p = _device(_with_config(add("deeplab", cmd_deeplab, "DeepLab on pseudo-masks: train, eval or predict")))
    p.add_argument("action", choices=["train", "evaluate", "predict"])
    p.add_argument("manifest")
    p.add_argument("out")
    p.add_argument("--checkpoint", help="DeepLab checkpoint for evaluate/predict")
    p.add_argument("--evaluate-on", help="train: then evaluate on this manifest (with ground truth) and predict it")
    p = _with_config(add("toy", cmd_toy, "the paper's toy experiment (Figures 1c and 2b) on MNIST 2 vs 8"))
    p.add_argument("out")
    p = add("serve", cmd_serve, "run the API (uvicorn service.main:app)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p = add("worker", cmd_worker, "run a Celery worker on RIB_IMAGE_QUEUE (or RIB_TRAINING_QUEUE with --training)")
    p.add_argument("--training", action="store_true")
    add("remote", cmd_remote, "the service over HTTP (rib-remote: submit, wait, results, export; "
        "'rib remote --help')")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="rib", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], None], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        return p

    for commands in (_data_commands, _classifier_and_map_commands, _refinement_commands, _job_commands):
        commands(add)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["remote"]:
        cmd_remote(argparse.Namespace(remote_args=argv[1:]))
    args = parser().parse_args(argv)
    try:
        if args.command not in ("serve", "worker"):  # those two set their own, per worker process
            from rib_core.runtime.threads import use_torch_threads

            use_torch_threads(int(os.environ.get("RIB_TORCH_THREADS") or 0) or None)
        args.fn(args)
    except (ManifestError, CheckpointError, ImageError, ValidationError, FileNotFoundError, ValueError) as e:
        print(f"rib {args.command}: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
