"""``rib`` commands that run a whole job or a process: DeepLab, the paper's reproduction, the toy
experiment, the API, a worker and the remote client."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rib_core.cli.options import AddCommand, build_config, device_of, with_config, with_device


def cmd_deeplab(args: argparse.Namespace) -> None:
    from rib_core.config.network_configs import DeepLabTrainConfig
    from rib_core.deeplab.job import run_training_job

    spec = {"kind": args.action, "manifest": args.manifest, "output": args.out,
            "config": build_config(DeepLabTrainConfig, args).model_dump(), "checkpoint": args.checkpoint,
            "evaluate_on": args.evaluate_on, "device": device_of(args), "progress": not args.quiet}
    summary = run_training_job({k: v for k, v in spec.items() if v is not None})
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2, default=str))


def cmd_reproduce(args: argparse.Namespace) -> None:
    from rib_core.config.presets import merge
    from rib_core.experiments.paper import DataInputs
    from rib_core.experiments.reproduce import SMOKE, ReproduceConfig, run_reproduce

    weights = str(Path(args.weights).resolve())
    deeplab = {"arch": "resnet101", "init_weights": str(Path(args.deeplab_weights).resolve())} \
        if args.deeplab_weights else {"arch": "resnet50", "init_weights": weights}
    base = {"dataset": args.dataset, "classifier": {"init_weights": weights},
            "refine": {"irn": {"init_weights": weights}}, "deeplab": deeplab}
    cfg = build_config(ReproduceConfig, args, merge(base, SMOKE) if args.smoke else base)
    inputs = DataInputs(Path(args.data), Path(args.sbd) if args.sbd else None,
                        Path(args.train_list) if args.train_list else None)
    run_reproduce(args.out, inputs, cfg, device_of(args), not args.quiet, args.stop_after)
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


def cmd_toy(args: argparse.Namespace) -> None:
    from rib_core.experiments.toy import run_toy_experiment
    from rib_core.experiments.toy_data import ToyConfig

    result = run_toy_experiment(args.out, build_config(ToyConfig, args))
    print(json.dumps(result.get("trends", {}), indent=2))


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


def job_commands(add: AddCommand) -> None:
    """DeepLab, the paper's reproduction, the toy experiment, and the service's processes."""
    p = with_device(with_config(add("reproduce", cmd_reproduce, "the paper's whole chain on PASCAL VOC or MS COCO with "
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
    p = with_device(with_config(add("deeplab", cmd_deeplab, "DeepLab on pseudo-masks: train, eval or predict")))
    p.add_argument("action", choices=["train", "evaluate", "predict"])
    p.add_argument("manifest")
    p.add_argument("out")
    p.add_argument("--checkpoint", help="DeepLab checkpoint for evaluate/predict")
    p.add_argument("--evaluate-on", help="train: then evaluate on this manifest (with ground truth) and predict it")
    p = with_config(add("toy", cmd_toy, "the paper's toy experiment (Figures 1c and 2b) on MNIST 2 vs 8"))
    p.add_argument("out")
    p = add("serve", cmd_serve, "run the API (uvicorn service.main:app)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p = add("worker", cmd_worker, "run a Celery worker on RIB_IMAGE_QUEUE (or RIB_TRAINING_QUEUE with --training)")
    p.add_argument("--training", action="store_true")
    add("remote", cmd_remote, "the service over HTTP (rib-remote: submit, wait, results, export; "
        "'rib remote --help')")
