"""``rib reproduce``: the whole chain on tiny folders in VOC's and COCO's own layouts, made from
MNIST scenes; the structure of the output and resumption are checked, not the scores."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from rib_core.cli import main, parser
from rib_core.cli.options import build_config
from rib_core.config.network_configs import ClassifierTrainConfig
from rib_core.data.classes import COCO_CLASSES, VOC_CLASSES
from rib_core.data.datasets import load_manifest, load_mask
from rib_core.data.demo_data import DemoDataConfig, DemoDataset, make_demo_dataset
from rib_core.experiments.demo_job import DemoJobConfig, scene_scale, single_digits
from rib_core.experiments.paper import PAPER, train_aug_ids
from rib_core.experiments.reproduce import STAGES, ReproduceConfig

SCENES = DemoDataConfig(n_train=40, n_val=8, canvas=64, digit_size=(26, 36), digits=[0, 1, 2, 3, 4],
                        max_per_image=2, seed=3)
# The networks of the test: ResNet-18 everywhere, from a torchvision state dict as --weights.
SMALL = ["--set", "classifier.arch=resnet18", "--set", "refine.irn.arch=resnet18", "--set", "deeplab.arch=resnet18"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> DemoDataset:
    return make_demo_dataset(tmp_path_factory.mktemp("scenes"), SCENES)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision ResNet-18 state dict file, standing in for the ImageNet weights."""
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def _all_records(scenes: DemoDataset) -> list[tuple[str, Path, Path, list[int]]]:
    """(VOC-style id, image, mask, class indices) of every scene, train then val."""
    out = []
    for manifest in (scenes.train, scenes.val):
        for r in manifest.records:
            out.append((f"2008_{len(out):06d}", Path(manifest.image_uri(r)), Path(manifest.mask_uri(r)),
                        manifest.label_indices(r)))
    return out


@pytest.fixture(scope="module")
def voc(scenes: DemoDataset, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A VOC2012 devkit (JPEGImages, Annotations, SegmentationClass for VOC's train and val ids,
    ImageSets/Segmentation) and an SBD folder whose lists add images without VOC masks; SBD's val
    list also names two VOC val images, which train_aug must leave out."""
    root = tmp_path_factory.mktemp("voc")
    devkit, sbd = root / "VOC2012", root / "benchmark_RELEASE" / "dataset"
    for d in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Segmentation"):
        (devkit / d).mkdir(parents=True)
    sbd.mkdir(parents=True)
    records = _all_records(scenes)
    ids = [i for i, *_ in records]
    lists = {"seg_train": ids[:12], "seg_val": ids[40:], "sbd_train": ids[12:34], "sbd_val": ids[34:40] + ids[40:42]}
    for image_id, image, mask, classes in records:
        Image.open(image).convert("RGB").save(devkit / "JPEGImages" / f"{image_id}.jpg", quality=95)
        objects = "".join(f"<object><name>{VOC_CLASSES[c]}</name></object>" for c in classes)
        (devkit / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{objects}</annotation>")
        if image_id in lists["seg_train"] or image_id in lists["seg_val"]:
            shutil.copy(mask, devkit / "SegmentationClass" / f"{image_id}.png")
    for name, path in (("seg_train", devkit / "ImageSets/Segmentation/train.txt"),
                       ("seg_val", devkit / "ImageSets/Segmentation/val.txt"),
                       ("sbd_train", sbd / "train.txt"), ("sbd_val", sbd / "val.txt")):
        path.write_text("\n".join(lists[name]) + "\n")
    return devkit, sbd.parent


@pytest.fixture(scope="module")
def coco(scenes: DemoDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train2014/, val2014/ and annotations/instances_*2014.json (80 categories; each digit a
    polygon: the box of its pixels)."""
    root = tmp_path_factory.mktemp("coco")
    (root / "annotations").mkdir()
    records = _all_records(scenes)
    for split, part in (("train", records[:40]), ("val", records[40:])):
        (root / f"{split}2014").mkdir()
        images, anns = [], []
        for n, (image_id, image, mask, _) in enumerate(part):
            name = f"COCO_{split}2014_{image_id.replace('_', '')}.jpg"
            Image.open(image).convert("RGB").save(root / f"{split}2014" / name, quality=95)
            gt = load_mask(str(mask))
            images.append({"id": n, "file_name": name, "height": gt.shape[0], "width": gt.shape[1]})
            for value in np.unique(gt[(gt > 0) & (gt < 255)]):
                ys, xs = np.nonzero(gt == value)
                x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
                anns.append({"id": len(anns), "image_id": n, "category_id": int(value), "iscrowd": 0,
                             "area": (x1 - x0) * (y1 - y0), "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
        categories = [{"id": i + 1, "name": c} for i, c in enumerate(COCO_CLASSES)]
        (root / "annotations" / f"instances_{split}2014.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return root


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(["reproduce", *argv, "--device", "cpu", "--quiet"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def test_train_aug_is_sbd_and_voc_train_without_voc_val(voc: tuple[Path, Path]) -> None:
    devkit, sbd = voc
    ids = train_aug_ids(devkit, sbd)
    val = set((devkit / "ImageSets/Segmentation/val.txt").read_text().split())
    assert len(ids) == 40 and not val & set(ids)
    assert set((devkit / "ImageSets/Segmentation/train.txt").read_text().split()) <= set(ids)


def test_help_explains_the_inputs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["reproduce", "--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0
    assert all(word in text for word in ("SegmentationClass", "--sbd", "train2014", "instances_train2014.json",
                                          "ImageNet ResNet-50", "--smoke", *STAGES))


def test_missing_inputs_are_refused_with_what_to_give(voc: tuple[Path, Path], weights: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    devkit, _ = voc
    assert main(["reproduce", "voc", str(devkit), "--weights", str(weights), "--out", str(tmp_path / "a")]) == 3
    assert "--sbd" in capsys.readouterr().err
    assert main(["reproduce", "coco", str(devkit), "--weights", str(weights), "--out", str(tmp_path / "b")]) == 3
    assert "train2014" in capsys.readouterr().err


def test_the_dataset_fills_the_authors_settings_and_explicit_values_win() -> None:
    coco = ReproduceConfig(dataset="coco", rib={"tau": 0.45})
    assert (coco.rib.lr, coco.rib.tau, coco.rib.crop_size, coco.rib.resize_long) == (5e-6, 0.45, 512, (320, 640))
    assert coco.refine.walk.bg_threshold == 0.22 and not coco.deeplab.retrain and coco.deeplab.crop_size == 481
    voc = ReproduceConfig()
    assert voc.rib.lr == 8e-6 and voc.deeplab.retrain and voc.deeplab.use_crf and voc.evaluation.thresholds[0] == 0.20


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


@pytest.mark.slow
def test_reproduce_voc_resumes_stage_by_stage(voc: tuple[Path, Path], weights: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    devkit, sbd = voc
    out = tmp_path / "voc_run"
    args = ["voc", str(devkit), "--sbd", str(sbd), "--weights", str(weights), "--out", str(out), "--smoke", *SMALL]
    first = _run(capsys, *args, "--stop-after", "maps")
    assert [s for s in STAGES if (out / "stages" / f"{s}.json").exists()] == ["data", "classifier", "cam", "maps"]
    assert "[seeds]" not in first
    assert f"paper  {PAPER['voc']['cam_seed'].value}" in first  # the CAM baseline beside Table 5c
    train = load_manifest(out / "data" / "train.jsonl")
    assert len(train) == 32 and sum(r.mask is not None for r in train.records) == 12
    assert {f"{r.id}.npz" for r in train.records} == set(_mtimes(out / "maps"))

    # A run killed inside the maps stage: no marker, some maps missing. The next run redoes only those.
    (out / "stages" / "maps.json").unlink()
    gone = [f"{r.id}.npz" for r in train.records[:3]]
    for name in gone:
        (out / "maps" / name).unlink()
    kept, classifier = _mtimes(out / "maps"), (out / "classifier" / "classifier.pth").stat().st_mtime_ns
    second = _run(capsys, *args)
    assert "[classifier] done before" in second and "[maps] running" in second and "[deeplab] running" in second
    after = _mtimes(out / "maps")
    assert {k: after[k] for k in kept} == kept and set(gone) <= set(after)
    assert (out / "classifier" / "classifier.pth").stat().st_mtime_ns == classifier
    for key in ("seed", "seed_crf", "mask", "deeplab"):
        figure = PAPER["voc"][key]
        assert f"{figure.label}" in second and f"paper  {figure.value} ({figure.source})" in second
    assert (out / "deeplab" / "round2").is_dir()  # VOC: appendix A.1's re-training
    assert len(list((out / "refined" / "masks").iterdir())) == 32

    third = _run(capsys, *args, "--set", "margin=100")
    assert third.count("done before") == len(STAGES) and "running" not in third and "from the paper" not in third
    summary = json.loads((out / "reproduce.json").read_text())
    assert list(summary["stages"]) == list(STAGES) and summary["paper"]["mask"]["value"] == 70.6
    # The figures printed again come from the markers, with a warning for each beyond a margin of 0.
    strict = _run(capsys, *args, "--set", "margin=0")
    assert strict.count("from the paper's") == len(PAPER["voc"])


@pytest.mark.slow
def test_reproduce_coco_runs_every_stage_and_skips_them_after(coco: Path, weights: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "coco_run"
    args = ["coco", str(coco), "--weights", str(weights), "--out", str(out), "--smoke", *SMALL]
    first = _run(capsys, *args)
    assert all((out / "stages" / f"{s}.json").exists() for s in STAGES)
    assert first.count("running") == len(STAGES)
    crf = [ln for ln in first.splitlines() if "RIB seed + CRF" in ln]
    assert len(crf) == 1 and "no figure in the paper" in crf[0]  # Table 1 has no COCO CRF column
    assert f"paper  {PAPER['coco']['mask'].value}" in first
    train = load_manifest(out / "data" / "train.jsonl")
    assert len(train) == 32 and all(r.mask is not None for r in train.records)
    assert train.classes == list(COCO_CLASSES)
    assert not (out / "deeplab" / "round2").exists()  # no re-training on COCO (appendix A.1)
    assert json.loads((out / "deeplab" / "evaluation" / "report.json").read_text())["images"] == 8
    second = _run(capsys, *args)
    assert second.count("done before") == len(STAGES) and "running" not in second


def test_the_usage_recipe_is_the_demos_classifier_recipe() -> None:
    """docs/USAGE.md's command lines build the demo's data and classifier configs."""
    text = (Path(__file__).parents[1] / "docs" / "USAGE.md").read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith(("rib demo-data runs/", "rib train-classifier runs/"))]
    built = []
    for line in lines:
        args = parser().parse_args(shlex.split(line)[1:])
        built.append(build_config(DemoDataConfig if args.command == "demo-data" else ClassifierTrainConfig, args))
    digits, pretrain, scenes_cfg, classifier = built
    demo = DemoJobConfig()
    assert (scenes_cfg, pretrain) == (demo.data, demo.pretrain)
    assert digits == single_digits(demo.data, demo.pretrain, demo.pretrain_images,
                                   scene_scale(demo.classifier, demo.data.canvas))
    assert classifier.model_copy(update={"init_weights": None}) == demo.classifier
    assert classifier.init_weights == str(Path(lines[1].split()[3]) / "classifier.pth")
