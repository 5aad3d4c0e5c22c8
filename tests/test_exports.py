"""Exports round trip: each format decoded by its own library (pycocotools, the Label Studio SDK,
Pillow for VOC's PNGs) gives back the masks pixel for pixel, ignore pixels included.

The masks are the demo generator's ground truth (real MNIST scenes) with a ring of ignore pixels
around every digit (as the refinement leaves undecided borders), several classes per image, and
one image with no foreground at all."""

from __future__ import annotations

import io
import json
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from rib_core.classes import IGNORE_INDEX
from rib_core.cli import EXIT_INPUT, main
from rib_core.datasets import Manifest, ManifestRecord, load_mask
from rib_core.demo_data import DemoDataset
from rib_core.exports import ExportConfig, MaskedImage, export_job, write_export
from rib_core.storage import LocalStorage, S3Storage
from rib_core.visualize import label_png
from tests.service_stack import moto_s3, s3


def _with_ignore(mask: np.ndarray) -> np.ndarray:
    """A one-pixel ring of 255 outside every digit: undecided borders, as a pseudo-mask has them."""
    out = mask.copy()
    out[ndimage.binary_dilation(mask > 0) & (mask == 0)] = IGNORE_INDEX
    return out


@pytest.fixture(scope="module")
def masks(demo: DemoDataset) -> dict[str, np.ndarray]:
    """Eight masks: multi-class scenes with ignore rings, a single-class one and an all-background one."""
    multi = [r for r in demo.train.records if len(r.labels) >= 2][:6]
    single = next(r for r in demo.train.records if len(r.labels) == 1)
    out = {r.id: _with_ignore(load_mask(demo.train.mask_uri(r))) for r in multi}
    out[single.id] = load_mask(demo.train.mask_uri(single))  # no ignore pixel at all
    out["empty"] = np.zeros_like(out[single.id])
    assert sum(len(np.unique(m[(m > 0) & (m < IGNORE_INDEX)])) >= 2 for m in out.values()) >= 6
    return out


def _items(masks: dict[str, np.ndarray]) -> list[MaskedImage]:
    return [MaskedImage(i, f"/data/images/{i}.png", partial(np.array, m)) for i, m in masks.items()]


def _paint(shape: tuple[int, int], regions: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """A label map from (value, binary region) pairs; regions must not overlap."""
    out = np.zeros(shape, np.uint8)
    for value, region in regions:
        assert not (out[region > 0] != 0).any(), "regions overlap"
        out[region > 0] = value
    return out


def test_coco_export_decodes_to_the_masks(masks, demo, tmp_path):
    from pycocotools import mask as coco_mask
    from pycocotools.coco import COCO

    classes = demo.train.classes
    (path,) = write_export(_items(masks), classes, ExportConfig(format="coco"), tmp_path)
    coco = COCO(str(path))  # pycocotools' own reader
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == classes
    assert coco.getCatIds() == list(range(1, len(classes) + 1))
    for entry, (image_id, mask) in zip(coco.dataset["images"], masks.items(), strict=True):
        assert entry["file_name"] == f"{image_id}.png" and (entry["height"], entry["width"]) == mask.shape
        anns = coco.loadAnns(coco.getAnnIds(imgIds=entry["id"]))
        assert sorted(a["category_id"] for a in anns) == [v for v in np.unique(mask) if 0 < v < IGNORE_INDEX]
        regions = [(a["category_id"], coco_mask.decode(a["segmentation"])) for a in anns]
        if (mask == IGNORE_INDEX).any():
            regions.append((IGNORE_INDEX, coco_mask.decode(entry["ignore_rle"])))
        else:
            assert "ignore_rle" not in entry
        np.testing.assert_array_equal(_paint(mask.shape, regions), mask)
        for a in anns:
            binary = mask == a["category_id"]
            ys, xs = np.nonzero(binary)
            assert a["area"] == binary.sum() and a["iscrowd"] == 0
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            np.testing.assert_array_equal(coco.annToMask(a), binary)
    (empty,) = [e["id"] for e in coco.dataset["images"] if e["file_name"] == "empty.png"]
    assert coco.getAnnIds(imgIds=[empty]) == []


def test_labelstudio_export_decodes_to_the_masks_and_validates(masks, demo, tmp_path):
    from label_studio_sdk.converter.brush import decode_rle
    from label_studio_sdk.label_interface import LabelInterface

    classes = demo.train.classes
    cfg = ExportConfig(format="labelstudio", image_url_prefix="/data/local-files/?d=scenes/")
    files = {p.name: p for p in write_export(_items(masks), classes, cfg, tmp_path)}
    config = LabelInterface(files["config.xml"].read_text())
    config.validate()
    assert config.get_control("tag").labels == classes
    tasks = json.loads(files["tasks.json"].read_text())
    assert len(tasks) == len(masks)
    for task, (image_id, mask) in zip(tasks, masks.items(), strict=True):
        assert task["data"] == {"image": f"/data/local-files/?d=scenes/{image_id}.png", "image_id": image_id}
        (prediction,) = task["predictions"]
        assert config.validate_prediction(prediction), config.validate_prediction(prediction, return_errors=True)
        regions = []
        for region in prediction["result"]:
            height, width = region["original_height"], region["original_width"]
            assert (height, width) == mask.shape and region["type"] == "brushlabels"
            alpha = np.reshape(decode_rle(region["value"]["rle"]), (height, width, 4))[:, :, 3]
            (name,) = region["value"]["brushlabels"]
            regions.append((classes.index(name) + 1, alpha))
        # Ignore pixels are in no region: they come back unlabelled, as background does.
        np.testing.assert_array_equal(_paint(mask.shape, regions), np.where(mask == IGNORE_INDEX, 0, mask))
    assert tasks[-1]["predictions"][0]["result"] == []  # the image with no foreground


def test_voc_export_keeps_values_and_ignore(masks, demo, tmp_path):
    classes = demo.train.classes
    write_export(_items(masks), classes, ExportConfig(format="voc"), tmp_path)
    for image_id, mask in masks.items():
        with Image.open(tmp_path / "SegmentationClass" / f"{image_id}.png") as im:
            assert im.mode == "P"
            np.testing.assert_array_equal(np.asarray(im), mask)
    assert (tmp_path / "classes.txt").read_text().split("\n") == ["background", *classes, ""]
    assert (tmp_path / "ImageSets" / "Segmentation" / "train.txt").read_text().split() == list(masks)


def _refine_folder(root: Path, demo: DemoDataset, masks: dict[str, np.ndarray]) -> Path:
    """What ``rib refine`` leaves: masks/<id>.png, crf/<id>.png and masks.jsonl."""
    ids = [i for i in masks if i != "empty"]
    for folder, transform in (("masks", lambda m: m), ("crf", lambda m: np.where(m == IGNORE_INDEX, 0, m))):
        (root / folder).mkdir(parents=True)
        for i in ids:
            (root / folder / f"{i}.png").write_bytes(label_png(transform(masks[i])))
    records = [ManifestRecord(i, demo.train.image_uri(demo.train.by_id(i)), demo.train.by_id(i).labels,
                              f"masks/{i}.png") for i in ids]
    Manifest(demo.train.classes, records, str(root)).save(root / "masks.jsonl")
    return root


def test_cli_exports_a_refine_folder(masks, demo, tmp_path):
    from pycocotools.coco import COCO

    results = _refine_folder(tmp_path / "refined", demo, masks)
    for name, expect in (("masks", lambda m: m), ("crf", lambda m: np.where(m == IGNORE_INDEX, 0, m))):
        out = tmp_path / f"coco-{name}"
        assert main(["export", str(results), "--format", "coco", "--out", str(out), "--masks", name]) == 0
        coco = COCO(str(out / "annotations.json"))
        for entry in coco.dataset["images"]:
            image_id = entry["file_name"].removesuffix(".png")
            assert image_id in masks  # the file name is the demo image's
            painted = coco.annToMask  # one class per annotation: paint them
            regions = [(a["category_id"], painted(a)) for a in coco.loadAnns(coco.getAnnIds(imgIds=entry["id"]))]
            np.testing.assert_array_equal(_paint((entry["height"], entry["width"]), regions),
                                          np.where(expect(masks[image_id]) == IGNORE_INDEX, 0, expect(masks[image_id])))
    assert main(["export", str(results / "masks.jsonl"), "--format", "voc", "--out", str(tmp_path / "voc")]) == 0
    assert len(list((tmp_path / "voc" / "SegmentationClass").glob("*.png"))) == len(masks) - 1


def test_cli_refuses_what_it_cannot_export(masks, demo, tmp_path, capsys):
    results = _refine_folder(tmp_path / "refined", demo, masks)
    assert main(["export", str(tmp_path), "--format", "coco", "--out", str(tmp_path / "o")]) == EXIT_INPUT
    assert "masks.jsonl" in capsys.readouterr().err
    assert main(["export", str(results), "--format", "coco", "--out", str(tmp_path / "o"), "--masks", "irn"]) \
        == EXIT_INPUT
    assert "no mask folder 'irn'" in capsys.readouterr().err
    assert main(["export", str(demo.root / "train.jsonl"), "--format", "voc", "--out", str(tmp_path / "gt")]) == 0
    # A class list shorter than the masks' values: refused, naming the image and the values.
    short = Manifest(demo.train.classes[:1], [], str(results))
    (results / "masks.jsonl").write_text(short.dumps() + "\n".join(
        json.dumps({"id": i, "image": f"{i}.png", "labels": [demo.train.classes[0]], "mask": f"masks/{i}.png"})
        for i in list(masks)[:2]))
    assert main(["export", str(results), "--format", "coco", "--out", str(tmp_path / "o")]) == EXIT_INPUT
    assert "that are no class" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["export", str(results), "--format", "yolo", "--out", str(tmp_path / "o")])
    assert e.value.code == 2


def _store_job(storage, job: str, masks: dict[str, np.ndarray]) -> None:
    """A job's images as the workers store them; the first with IRN's mask too, the last unfinished."""
    ids = list(masks)
    for n, image_id in enumerate(ids):
        prefix = f"jobs/{job}/images/{image_id}/"
        storage.put(prefix + "crf_mask.png", label_png(np.zeros_like(masks[image_id]) if n == 0 else masks[image_id]))
        if n == 0:
            storage.put(prefix + "irn_mask.png", label_png(masks[image_id]))
        if n < len(ids) - 1:
            storage.put(prefix + "meta.json", json.dumps({"image_id": image_id}).encode())


def _zip_voc(data: bytes) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {Path(n).stem: np.asarray(Image.open(io.BytesIO(archive.read(n))))
                for n in archive.namelist() if n.startswith("SegmentationClass/")}


def test_job_export_in_local_storage_and_through_the_cli(masks, demo, tmp_path):
    storage = LocalStorage(tmp_path / "results")
    _store_job(storage, "j1", masks)
    finished = dict(list(masks.items())[:-1])
    key = export_job(storage, "jobs/j1", demo.train.classes, ExportConfig(format="voc"))
    assert key == "jobs/j1/exports/voc.zip"
    got = _zip_voc(storage.get(key))
    assert got.keys() == finished.keys()  # the unfinished image is left out
    for image_id, mask in finished.items():
        np.testing.assert_array_equal(got[image_id], mask)  # IRN's mask where there is one
    out = tmp_path / "ls"  # the class list from the service's companion manifest
    assert main(["export", str(tmp_path / "results" / "jobs" / "j1"), "--classes", str(demo.root / "train.jsonl"),
                 "--format", "labelstudio", "--out", str(out)]) == 0
    assert [t["data"]["image_id"] for t in json.loads((out / "tasks.json").read_text())] == sorted(finished)
    with pytest.raises(ValueError, match="no finished image"):
        export_job(storage, "jobs/nope", demo.train.classes, ExportConfig(format="coco"))


def test_job_export_on_s3(masks, demo):
    with moto_s3() as endpoint:
        client = s3(endpoint)
        client.create_bucket(Bucket="rib-exports")  # moto's state is per process: a bucket of our own
        storage = S3Storage("rib-exports", "results", client=client)
        _store_job(storage, "j2", masks)
        uris = {i: f"s3://rib/uploads/{i}.jpg" for i in masks}
        key = export_job(storage, "jobs/j2", demo.train.classes, ExportConfig(format="coco"), uris)
        with zipfile.ZipFile(io.BytesIO(storage.get(key))) as archive:
            coco = json.loads(archive.read("annotations.json"))
    assert [e["file_name"] for e in coco["images"]] == sorted(f"{i}.jpg" for i in list(masks)[:-1])


def test_export_help_names_the_formats(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("coco", "labelstudio", "voc", "--out", "--masks", "--classes", "--image-url-prefix"):
        assert word in text
