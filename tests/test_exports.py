"""Exports round trip: each format read by the tools users open it with (pycocotools and COCOeval,
the Label Studio SDK, torchvision's ``VOCSegmentation``, Pillow for VOC's PNGs) gives back the masks
pixel for pixel, ignore pixels included, and the images as they were.

The masks are the demo generator's ground truth (real MNIST scenes) with a ring of ignore pixels
around every digit (as the refinement leaves undecided borders), several classes per image, and
one image with no foreground at all. Datumaro is not installed beside this project's pins (every
release changes pillow, pandas or numpy): docs/EXPORTS.md has the check made in a
separate environment."""

from __future__ import annotations

import io
import json
import zipfile
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from rib_core.cli import EXIT_INPUT, main
from rib_core.data.classes import IGNORE_INDEX
from rib_core.data.datasets import Manifest, ManifestRecord, load_image, load_mask
from rib_core.data.demo_data import DemoDataset
from rib_core.io.export_sources import export_job, presigned_image_url
from rib_core.io.exports import COCO_ANNOTATIONS, ExportConfig, write_export
from rib_core.io.localization_map import LocalizationMap
from rib_core.io.masked_image import MaskedImage, region_scores
from rib_core.io.storage import LocalStorage, S3Storage
from rib_core.io.visualize import PALETTE, label_png
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


def _image_of(demo: DemoDataset, masks: dict[str, np.ndarray], image_id: str) -> str:
    """The demo image of a mask; the all-background mask gets a scene none of the others uses."""
    if image_id == "empty":
        return demo.train.image_uri(next(r for r in demo.train.records if r.id not in masks))
    return demo.train.image_uri(demo.train.by_id(image_id))


def _items(masks: dict[str, np.ndarray], demo: DemoDataset) -> list[MaskedImage]:
    return [MaskedImage(i, _image_of(demo, masks, i), partial(np.array, m)) for i, m in masks.items()]


def _paint(shape: tuple[int, int], regions: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """A label map from (value, binary region) pairs; regions must not overlap."""
    out = np.zeros(shape, np.uint8)
    for value, region in regions:
        assert not (out[region > 0] != 0).any(), "regions overlap"
        out[region > 0] = value
    return out


def test_coco_export_decodes_to_the_masks_in_the_standard_layout(masks, demo, tmp_path):
    from pycocotools import mask as coco_mask
    from pycocotools.coco import COCO

    classes = demo.train.classes
    written = write_export(_items(masks, demo), classes, ExportConfig(format="coco"), tmp_path)
    assert {p.relative_to(tmp_path).parts[0] for p in written} == {"annotations", "images"}
    coco = COCO(str(tmp_path / COCO_ANNOTATIONS))  # pycocotools' own reader
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == classes
    assert coco.getCatIds() == list(range(1, len(classes) + 1))
    for entry, (image_id, mask) in zip(coco.dataset["images"], masks.items(), strict=True):
        source = _image_of(demo, masks, image_id)
        assert entry["file_name"] == Path(source).name and (entry["height"], entry["width"]) == mask.shape
        assert (tmp_path / "images" / entry["file_name"]).read_bytes() == Path(source).read_bytes()
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
            assert a["score"] == 1.0  # masks without a map (ground truth here): nothing ranks them
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            np.testing.assert_array_equal(coco.annToMask(a), binary)
    (empty,) = [e["id"] for e in coco.dataset["images"] if e["file_name"] == Path(_image_of(demo, masks, "empty")).name]
    assert coco.getAnnIds(imgIds=[empty]) == []


def test_coco_names_images_that_share_a_file_name_by_their_ids(masks, demo, tmp_path):
    """Two images from different folders with one file name: images/ holds both, named by id."""
    first, second = _items(masks, demo)[:2]
    twin = tmp_path / "elsewhere" / Path(first.image).name
    twin.parent.mkdir()
    twin.write_bytes(Path(second.image).read_bytes())
    items = [first, MaskedImage("other", str(twin), second.read_mask)]
    write_export(items, demo.train.classes, ExportConfig(format="coco"), tmp_path / "out")
    coco = json.loads((tmp_path / "out" / COCO_ANNOTATIONS).read_text())
    assert [e["file_name"] for e in coco["images"]] == [f"{first.id}.png", "other.png"]
    assert (tmp_path / "out" / "images" / "other.png").read_bytes() == Path(second.image).read_bytes()
    assert (tmp_path / "out" / "images" / f"{first.id}.png").read_bytes() == Path(first.image).read_bytes()


def _coco_eval(gt_path: Path, results: list[dict]) -> dict[str, float]:
    """COCOeval's segmentation AP and AP50 of ``results`` against the ground truth file."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(gt_path))
    evaluator = COCOeval(gt, gt.loadRes(results), iouType="segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return {"ap": float(evaluator.stats[0]), "ap50": float(evaluator.stats[1])}


def test_cocoeval_reads_the_export_as_ground_truth_and_as_results(masks, demo, tmp_path):
    """The same file is COCOeval's truth and its results: perfect. Results whose masks lost the first
    class of every image with two score below perfect (those regions are missed), but not zero."""
    classes, items = demo.train.classes, _items(masks, demo)
    cfg = ExportConfig(format="coco", images=False)
    write_export(items, classes, cfg, tmp_path / "gt")
    gt_path = tmp_path / "gt" / COCO_ANNOTATIONS
    same = json.loads(gt_path.read_text())["annotations"]
    assert _coco_eval(gt_path, same) == {"ap": 1.0, "ap50": 1.0}

    def worse(mask: np.ndarray) -> np.ndarray:
        present = [v for v in np.unique(mask) if 0 < v < IGNORE_INDEX]
        return np.where(mask == present[0], 0, mask) if len(present) > 1 else mask

    degraded = [MaskedImage(i.id, i.image, partial(worse, i.read_mask())) for i in items]
    write_export(degraded, classes, cfg, tmp_path / "res")
    results = json.loads((tmp_path / "res" / COCO_ANNOTATIONS).read_text())["annotations"]
    got = _coco_eval(gt_path, results)
    assert 0 < got["ap"] < 1 and 0 < got["ap50"] < 1


def _stand_in_map(mask: np.ndarray, values: list[int]) -> LocalizationMap:
    """A map made from the mask itself, blurred, with a channel for each of ``values``: any map will
    do for the arithmetic of the scores (the demo run's test scores real ones)."""
    channels = np.zeros((len(values), *mask.shape), np.float32)
    for c, v in enumerate(values):
        channels[c] = ndimage.gaussian_filter((mask == v).astype(np.float32), 3)
        channels[c] /= channels[c].max()
    return LocalizationMap(np.array(values) - 1, channels[:, ::4, ::4], channels)


def test_region_scores_are_the_maps_mean_inside_each_region(masks):
    """Keyed on one class of two: that class scores the map's mean over its region, the other 0."""
    mask = next(m for m in masks.values() if len([v for v in np.unique(m) if 0 < v < IGNORE_INDEX]) >= 2)
    first, second = [int(v) for v in np.unique(mask) if 0 < v < IGNORE_INDEX][:2]
    lmap = _stand_in_map(mask, [first])
    scores = region_scores(mask, lmap)
    assert scores[first] == pytest.approx(lmap.high_res[0][mask == first].mean(), abs=1e-4) and 0 < scores[first] < 1
    assert scores[second] == 0.0
    with pytest.raises(ValueError, match="not the same image"):
        region_scores(mask[:-1], lmap)


def test_labelstudio_export_decodes_to_the_masks_and_validates(masks, demo, tmp_path):
    from label_studio_sdk.converter.brush import decode_rle
    from label_studio_sdk.label_interface import LabelInterface

    classes = demo.train.classes
    cfg = ExportConfig(format="labelstudio", image_url_prefix="/data/local-files/?d=scenes/")
    files = {p.name: p for p in write_export(_items(masks, demo), classes, cfg, tmp_path)}
    config = LabelInterface(files["config.xml"].read_text())
    config.validate()
    assert config.get_control("tag").labels == classes
    tasks = json.loads(files["tasks.json"].read_text())
    assert len(tasks) == len(masks)
    for task, (image_id, mask) in zip(tasks, masks.items(), strict=True):
        name = Path(_image_of(demo, masks, image_id)).name
        assert task["data"] == {"image": f"/data/local-files/?d=scenes/{name}", "image_id": image_id}
        (prediction,) = task["predictions"]
        assert config.validate_prediction(prediction), config.validate_prediction(prediction, return_errors=True)
        regions = []
        for region in prediction["result"]:
            height, width = region["original_height"], region["original_width"]
            assert (height, width) == mask.shape and region["type"] == "brushlabels" and region["score"] == 1.0
            alpha = np.reshape(decode_rle(region["value"]["rle"]), (height, width, 4))[:, :, 3]
            (name,) = region["value"]["brushlabels"]
            regions.append((classes.index(name) + 1, alpha))
        assert prediction["score"] == (1.0 if regions else 0.0)
        # Ignore pixels are in no region: they come back unlabelled, as background does.
        np.testing.assert_array_equal(_paint(mask.shape, regions), np.where(mask == IGNORE_INDEX, 0, mask))
    assert tasks[-1]["predictions"][0]["result"] == []  # the image with no foreground
    # A URL builder names the images when no prefix is given; without either, the source's paths stay.
    write_export(_items(masks, demo), classes, ExportConfig(format="labelstudio"), tmp_path / "b",
                 image_url=lambda item: f"https://images.example/{item.id}")
    assert [t["data"]["image"] for t in json.loads((tmp_path / "b" / "tasks.json").read_text())] == \
        [f"https://images.example/{i}" for i in masks]


def test_voc_export_opens_in_torchvision_with_our_class_names(masks, demo, tmp_path):
    """Extracted under ``VOCdevkit/VOC2012``, the export is torchvision's ``VOCSegmentation`` as it is:
    the images and the masks (255 kept) come back, and ``labelmap.txt`` names our classes."""
    from torchvision.datasets import VOCSegmentation

    classes = demo.train.classes
    root = tmp_path / "VOCdevkit" / "VOC2012"
    write_export(_items(masks, demo), classes, ExportConfig(format="voc"), root)
    assert (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split() == list(masks)
    voc = VOCSegmentation(str(tmp_path), year="2012", image_set="train")
    assert len(voc) == len(masks)
    for (image, target), (image_id, mask) in zip(voc, masks.items(), strict=True):
        assert target.mode == "P"
        np.testing.assert_array_equal(np.asarray(target), mask)
        # A PNG, encoded as JPEG (quality 95, 4:4:4): within a few grey levels even on the scenes' noise
        source = load_image(_image_of(demo, masks, image_id))
        assert np.asarray(image).shape == source.shape
        assert np.abs(np.asarray(image, np.float32) - source).mean() < 5
    lines = (root / "labelmap.txt").read_text().splitlines()
    assert lines[0] == "# label:color_rgb:parts:actions"
    parsed = [line.split(":") for line in lines[1:]]
    assert [p[0] for p in parsed] == ["background", *classes] and all(p[2:] == ["", ""] for p in parsed)
    assert [tuple(int(c) for c in p[1].split(",")) for p in parsed] == [tuple(PALETTE[v]) for v in range(len(parsed))]
    with pytest.raises(ValueError, match=r"labelmap\.txt"):
        write_export(_items(masks, demo), ["a:b", *classes[1:]], ExportConfig(format="voc"), tmp_path / "bad")


def test_exports_without_images(masks, demo, tmp_path):
    classes = demo.train.classes
    for fmt, folder in (("coco", "images"), ("voc", "JPEGImages")):
        write_export(_items(masks, demo), classes, ExportConfig(format=fmt, images=False), tmp_path / fmt)
        assert not (tmp_path / fmt / folder).exists()
    lost = [MaskedImage("x", str(tmp_path / "gone.png"), partial(np.array, next(iter(masks.values()))))]
    with pytest.raises(ValueError, match="images=false"):
        write_export(lost, classes, ExportConfig(format="voc"), tmp_path / "lost")
    assert write_export(lost, classes, ExportConfig(format="voc", images=False), tmp_path / "lost")


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
        coco = COCO(str(out / COCO_ANNOTATIONS))
        for entry in coco.dataset["images"]:
            image_id = entry["file_name"].removesuffix(".png")
            assert image_id in masks and (out / "images" / entry["file_name"]).exists()  # the demo image's name
            painted = coco.annToMask  # one class per annotation: paint them
            regions = [(a["category_id"], painted(a)) for a in coco.loadAnns(coco.getAnnIds(imgIds=entry["id"]))]
            np.testing.assert_array_equal(_paint((entry["height"], entry["width"]), regions),
                                          np.where(expect(masks[image_id]) == IGNORE_INDEX, 0, expect(masks[image_id])))
    assert main(["export", str(results / "masks.jsonl"), "--format", "voc", "--out", str(tmp_path / "voc")]) == 0
    assert len(list((tmp_path / "voc" / "SegmentationClass").glob("*.png"))) == len(masks) - 1
    assert len(list((tmp_path / "voc" / "JPEGImages").glob("*.jpg"))) == len(masks) - 1
    # --maps: the maps the masks came from score each region
    maps = {}
    for i in (i for i in masks if i != "empty"):
        maps[i] = _stand_in_map(masks[i], [int(v) for v in np.unique(masks[i]) if 0 < v < IGNORE_INDEX])
        maps[i].save(tmp_path / "refined" / f"{i}.npz")
    out = tmp_path / "scored"
    assert main(["export", str(results), "--format", "coco", "--out", str(out), "--no-images",
                 "--maps", str(tmp_path / "refined")]) == 0
    coco = COCO(str(out / COCO_ANNOTATIONS))
    assert not (out / "images").exists()
    for entry in coco.dataset["images"]:
        image_id = entry["file_name"].removesuffix(".png")
        expected = region_scores(masks[image_id], maps[image_id])
        assert {a["category_id"]: a["score"] for a in coco.loadAnns(coco.getAnnIds(imgIds=entry["id"]))} == expected
        assert all(0 < v < 1 for v in expected.values())


def test_cli_refuses_what_it_cannot_export(masks, demo, tmp_path, capsys):
    results = _refine_folder(tmp_path / "refined", demo, masks)
    assert main(["export", str(tmp_path), "--format", "coco", "--out", str(tmp_path / "o")]) == EXIT_INPUT
    assert "masks.jsonl" in capsys.readouterr().err
    assert main(["export", str(results), "--format", "coco", "--out", str(tmp_path / "o"), "--masks", "irn"]) \
        == EXIT_INPUT
    assert "no mask folder 'irn'" in capsys.readouterr().err
    assert main(["export", str(results), "--format", "coco", "--out", str(tmp_path / "o"), "--maps",
                 str(tmp_path / "nomaps")]) == EXIT_INPUT
    assert "no maps folder" in capsys.readouterr().err
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


def _store_job(storage, job: str, masks: dict[str, np.ndarray], demo: DemoDataset) -> dict[str, str]:
    """A job's images as the API and the workers store them (the upload, the map, the masks, the
    marker last); the first with IRN's mask too, the last unfinished. Returns the request's image URIs."""
    ids, uris = list(masks), {}
    for n, image_id in enumerate(ids):
        upload = f"jobs/{job}/uploads/{image_id}"
        storage.put(upload, Path(_image_of(demo, masks, image_id)).read_bytes())
        uris[image_id] = storage.uri(upload)
        prefix = f"jobs/{job}/images/{image_id}/"
        values = [int(v) for v in np.unique(masks[image_id]) if 0 < v < IGNORE_INDEX]
        storage.put(prefix + "map.npz", _stand_in_map(masks[image_id], values).to_bytes())
        storage.put(prefix + "crf_mask.png", label_png(np.zeros_like(masks[image_id]) if n == 0 else masks[image_id]))
        if n == 0:
            storage.put(prefix + "irn_mask.png", label_png(masks[image_id]))
        if n < len(ids) - 1:
            storage.put(prefix + "meta.json", json.dumps({"image_id": image_id}).encode())
    storage.put(f"jobs/{job}/request.json", json.dumps({"items": [{"id": i, "image": u} for i, u in uris.items()]})
                .encode())
    return uris


def _zip_voc(data: bytes) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {Path(n).stem: np.asarray(Image.open(io.BytesIO(archive.read(n))))
                for n in archive.namelist() if n.startswith("SegmentationClass/")}


def test_job_export_in_local_storage_and_through_the_cli(masks, demo, tmp_path):
    storage = LocalStorage(tmp_path / "results")
    uris = _store_job(storage, "j1", masks, demo)
    finished = dict(list(masks.items())[:-1])
    key = export_job(storage, "jobs/j1", demo.train.classes, ExportConfig(format="voc"), uris)
    assert key == "jobs/j1/exports/voc.zip"
    got = _zip_voc(storage.get(key))
    assert got.keys() == finished.keys()  # the unfinished image is left out
    for image_id, mask in finished.items():
        np.testing.assert_array_equal(got[image_id], mask)  # IRN's mask where there is one
    with zipfile.ZipFile(io.BytesIO(storage.get(key))) as archive:
        assert sorted(n for n in archive.namelist() if n.startswith("JPEGImages/")) == \
            sorted(f"JPEGImages/{i}.jpg" for i in finished)
    with pytest.raises(ValueError, match="was not given"):  # images to copy, but no request naming them
        export_job(storage, "jobs/j1", demo.train.classes, ExportConfig(format="coco"))
    job = str(tmp_path / "results" / "jobs" / "j1")
    out = tmp_path / "ls"  # the class list from the service's companion manifest, the images from request.json
    assert main(["export", job, "--classes", str(demo.root / "train.jsonl"), "--format", "labelstudio",
                 "--out", str(out)]) == 0
    tasks = json.loads((out / "tasks.json").read_text())
    assert [t["data"]["image_id"] for t in tasks] == sorted(finished)
    assert [t["data"]["image"] for t in tasks] == [uris[i] for i in sorted(finished)]
    assert main(["export", job, "--classes", str(demo.root / "train.jsonl"), "--format", "coco",
                 "--out", str(tmp_path / "coco")]) == 0
    assert sorted(p.name for p in (tmp_path / "coco" / "images").iterdir()) == sorted(finished)
    with pytest.raises(ValueError, match="no finished image"):
        export_job(storage, "jobs/nope", demo.train.classes, ExportConfig(format="coco"))


def test_job_export_on_s3_with_scores_images_and_presigned_urls(masks, demo):
    """A job in S3: the COCO zip holds the images from their bucket and each region's score from the
    job's map; Label Studio's tasks name presigned URLs that give the images back."""
    finished = list(masks)[:-1]
    with moto_s3() as endpoint:
        client = s3(endpoint)
        client.create_bucket(Bucket="rib-exports")  # moto's state is per process: a bucket of our own
        storage = S3Storage("rib-exports", "results", client=client)
        uris = _store_job(storage, "j2", masks, demo)
        key = export_job(storage, "jobs/j2", demo.train.classes, ExportConfig(format="coco"), uris)
        with zipfile.ZipFile(io.BytesIO(storage.get(key))) as archive:
            coco = json.loads(archive.read(COCO_ANNOTATIONS))
            images = {n.removeprefix("images/"): archive.read(n) for n in archive.namelist() if n.startswith("images/")}
        key = export_job(storage, "jobs/j2", demo.train.classes, ExportConfig(format="labelstudio"), uris,
                         image_url=presigned_image_url(storage, 600))
        with zipfile.ZipFile(io.BytesIO(storage.get(key))) as archive:
            tasks = json.loads(archive.read("tasks.json"))
        served = {t["data"]["image_id"]: httpx.get(t["data"]["image"]) for t in tasks}
    assert [e["file_name"] for e in coco["images"]] == sorted(finished) == sorted(images) == sorted(served)
    for entry in coco["images"]:
        image_id = entry["file_name"]
        source = Path(_image_of(demo, masks, image_id)).read_bytes()
        assert images[image_id] == source and served[image_id].status_code == 200
        assert served[image_id].content == source
        mask = masks[image_id]  # the final mask: IRN's for the first image, seed + CRF's for the others
        lmap = _stand_in_map(mask, [int(v) for v in np.unique(mask) if 0 < v < IGNORE_INDEX])
        scores = {a["category_id"]: a["score"] for a in coco["annotations"] if a["image_id"] == entry["id"]}
        assert scores == region_scores(mask, lmap)


def test_export_help_names_the_formats(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("coco", "labelstudio", "voc", "--out", "--masks", "--classes", "--image-url-prefix", "--maps",
                 "--no-images"):
        assert word in text
