"""Pseudo-masks in the formats other tools read as they are: COCO, Label Studio and PASCAL VOC.

A mask here is a label map: 0 background, ``i + 1`` for ``classes[i]``, 255 ignore (pixels the
refinement left undecided). The exports (docs/EXPORTS.md):

- ``coco``: the layout CVAT and Datumaro import, ``annotations/instances_default.json`` and the
  images under ``images/``. One annotation per class present in an image (all of that class's
  pixels in it, connected or not: a semantic mask has no instances), as an RLE made by pycocotools
  (``counts`` as text), with its area, bounding box and ``score`` (:func:`region_scores`);
  ``iscrowd`` 0. Categories are the class list with ids 1..N (the mask's values). The file is
  COCOeval's ground truth as it is (``COCO(path)``) and its results as they are
  (``gt.loadRes(data["annotations"])``).
- ``labelstudio``: ``tasks.json``, one task per image whose ``predictions`` hold one brush region
  per class present (with its ``score``; the prediction's ``score`` is their mean), encoded by the
  Label Studio SDK's own brush RLE encoder, and ``config.xml``, the labelling config those regions
  belong to (``BrushLabels`` named ``tag`` on ``image``). A task's image is a URL Label Studio can
  open when the caller gives a prefix or a URL builder (:func:`presigned_image_url`).
- ``voc``: ``SegmentationClass/<id>.png`` (palette PNGs, the values above), ``JPEGImages/<id>.jpg``,
  ``labelmap.txt`` (Datumaro's and CVAT's ``name:r,g,b::`` lines, background first, so that they
  name the classes ours and not VOC's) and ``ImageSets/Segmentation/train.txt`` (the ids): the
  layout torchvision's ``VOCSegmentation`` reads under ``VOCdevkit/VOC2012``.

``ExportConfig.images`` false leaves the images out of COCO and VOC (annotations and masks only).

Ignore pixels (255): COCO and Label Studio have no "ignore" label, so they are in no annotation
and no brush region (a reviewer sees them unlabelled). COCO images that have some also carry
``ignore_rle``, the RLE of those pixels: an extra field that COCO readers skip, kept so that the
export loses nothing. VOC keeps 255, as VOC's own masks do ("void").

Where the masks come from (a ``rib refine`` folder, a manifest with masks, a service job, a pipeline
job) is :mod:`rib_core.io.export_sources`.
"""

from __future__ import annotations

import io
import json
import posixpath
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args
from xml.sax.saxutils import quoteattr

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from rib_core.data.classes import IGNORE_INDEX
from rib_core.data.datasets import decode_image
from rib_core.io.masked_image import ImageUrl, MaskedImage, checked_mask, present, scored
from rib_core.io.visualize import PALETTE, label_png

ExportFormat = Literal["coco", "labelstudio", "voc"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)
# Label Studio names of the config's tags, used by the tasks' regions.
LS_BRUSH, LS_IMAGE = "tag", "image"
MODEL_VERSION = "rib"
COCO_ANNOTATIONS = "annotations/instances_default.json"  # CVAT's and Datumaro's name for the one subset
VOC_SUBSET = "train"
VOC_JPEG_QUALITY = 95


class ExportConfig(BaseModel):
    """What to export to; the API and the CLI validate their arguments with it."""

    model_config = ConfigDict(extra="forbid")

    format: ExportFormat
    # Label Studio loads a task's image from a URL: with a prefix, a task's image is the prefix and
    # the image's file name (e.g. "/data/local-files/?d=images/" for files Label Studio serves);
    # without one, the caller's URL builder's, else the image's path or s3:// URI as the source names it.
    image_url_prefix: str | None = None
    images: bool = Field(True, description="COCO and VOC: copy the images into the export (images/, JPEGImages/); "
                                           "false for annotations and masks only")


def _coco_region(binary: np.ndarray) -> dict[str, Any]:
    """pycocotools' RLE of a binary mask (``counts`` as text, for JSON), its area and bounding box."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(binary.astype(np.uint8)))
    return {"segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": float(coco_mask.area(rle)), "bbox": [float(v) for v in coco_mask.toBbox(rle)]}


def _coco_file_names(images: Sequence[MaskedImage]) -> list[str]:
    """The images' names under ``images/``: their own file names, or, when two share one, the ids
    with the file name's extension (ids are unique)."""
    names = [item.file_name for item in images]
    if len(set(names)) < len(names):
        names = [item.id + posixpath.splitext(item.file_name)[1] for item in images]
    if len(set(names)) < len(names):
        raise ValueError(f"images share file names: {[n for n, c in Counter(names).items() if c > 1][:5]}")
    return names


def _coco_files(images: Iterable[MaskedImage], classes: Sequence[str], with_images: bool,
                ) -> Iterator[tuple[str, bytes]]:
    """The images (as their reading goes) and then the annotations (module docstring); image and
    annotation ids count from 1."""
    items = list(images)
    out: dict[str, Any] = {
        "info": {"description": "RIB pseudo-masks", "version": "1.0"}, "licenses": [],
        "images": [], "annotations": [],
        "categories": [{"id": i + 1, "name": name, "supercategory": ""} for i, name in enumerate(classes)]}
    for image_id, (item, name) in enumerate(zip(items, _coco_file_names(items), strict=True), start=1):
        mask, scores = scored(item, len(classes))
        if with_images:
            yield f"images/{name}", item.image_bytes()
        entry = {"id": image_id, "file_name": name, "height": mask.shape[0], "width": mask.shape[1]}
        if (mask == IGNORE_INDEX).any():
            entry["ignore_rle"] = _coco_region(mask == IGNORE_INDEX)["segmentation"]
        out["images"].append(entry)
        for value, score in scores.items():
            out["annotations"].append({"id": len(out["annotations"]) + 1, "image_id": image_id,
                                       "category_id": value, **_coco_region(mask == value), "iscrowd": 0,
                                       "score": score})
    yield COCO_ANNOTATIONS, json.dumps(out).encode()


def labelstudio_config(classes: Sequence[str]) -> str:
    """The labelling config of the tasks: an image and one brush label per class, in the masks' colours."""
    colours = ["#" + "".join(f"{c:02x}" for c in PALETTE[i + 1]) for i in range(len(classes))]
    labels = "\n".join(f'    <Label value={quoteattr(name)} background="{colour}"/>'
                       for name, colour in zip(classes, colours, strict=True))
    return (f'<View>\n  <Image name="{LS_IMAGE}" value="$image" zoom="true"/>\n'
            f'  <BrushLabels name="{LS_BRUSH}" toName="{LS_IMAGE}">\n{labels}\n  </BrushLabels>\n</View>\n')


def _brush_rle(binary: np.ndarray) -> list[int]:
    """Label Studio's brush RLE of a binary mask, by its SDK (painted pixels are 255 in all 4 channels)."""
    from label_studio_sdk.converter.brush import mask2rle

    return [int(b) for b in mask2rle(binary.astype(np.uint8) * 255)]


def brush_regions(mask: np.ndarray, labels: Mapping[int, str], region_id: str, from_name: str = LS_BRUSH,
                  to_name: str = LS_IMAGE, scores: Mapping[int, float] | None = None) -> list[dict[str, Any]]:
    """One Label Studio brush region per value of ``labels`` (mask value -> label name) present in the
    label map ``mask``, with ids ``<region_id>-<value>`` (and ``scores[value]`` as its score, if given)."""
    height, width = mask.shape
    return [{"id": f"{region_id}-{value}", "from_name": from_name, "to_name": to_name, "type": "brushlabels",
             "original_width": width, "original_height": height, "image_rotation": 0,
             **({"score": scores[value]} if scores is not None else {}),
             "value": {"format": "rle", "rle": _brush_rle(mask == value), "brushlabels": [labels[value]]}}
            for value in present(mask) if value in labels]


def labelstudio_tasks(images: Iterable[MaskedImage], classes: Sequence[str], image_url_prefix: str | None = None,
                      image_url: ImageUrl | None = None) -> list[dict[str, Any]]:
    """Label Studio tasks with the masks as predictions, one scored brush region per class present.

    A task's image: ``image_url_prefix`` + the file name, else ``image_url(item)`` (e.g.
    :func:`presigned_image_url`), else the image's path or URI. The prediction's score is its
    regions' mean (0 with none: nothing found is what a reviewer should look at first)."""
    tasks = []
    for item in images:
        mask, scores = scored(item, len(classes))
        regions = brush_regions(mask, {value: classes[value - 1] for value in scores}, item.id, scores=scores)
        if image_url_prefix is not None:
            url = image_url_prefix + item.file_name
        else:
            url = image_url(item) if image_url is not None else item.image
        mean = round(sum(scores.values()) / len(scores), 4) if scores else 0.0
        tasks.append({"data": {"image": url, "image_id": item.id},
                      "predictions": [{"model_version": MODEL_VERSION, "score": mean, "result": regions}]})
    return tasks


def voc_labelmap(classes: Sequence[str]) -> str:
    """``labelmap.txt`` as Datumaro and CVAT read it: ``name:r,g,b::`` per label in the masks' colours,
    background first; without it their VOC importers name the values with VOC's own classes."""
    bad = [name for name in classes if ":" in name or "\n" in name]
    if bad:
        raise ValueError(f"class names {bad[:5]} hold ':' or a line break, which labelmap.txt cannot: rename them")
    lines = [f"{name}:{','.join(str(int(c)) for c in PALETTE[value])}::"
             for value, name in enumerate(("background", *classes))]
    return "# label:color_rgb:parts:actions\n" + "\n".join(lines) + "\n"


def _jpeg(data: bytes) -> bytes:
    """The image as a JPEG, the only kind VOC's JPEGImages holds (torchvision opens ``<id>.jpg``):
    a JPEG as it is, anything else decoded and encoded at quality 95 without chroma subsampling
    (4:2:0 blurs colour edges, which is what a segmentation network is trained on)."""
    if data[:3] == b"\xff\xd8\xff":
        return data
    buf = io.BytesIO()
    Image.fromarray(decode_image(data)).save(buf, format="JPEG", quality=VOC_JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def _voc_files(images: Iterable[MaskedImage], classes: Sequence[str], with_images: bool,
               ) -> Iterator[tuple[str, bytes]]:
    labelmap = voc_labelmap(classes)
    ids = []
    for item in images:
        yield f"SegmentationClass/{item.id}.png", label_png(checked_mask(item, len(classes)))
        if with_images:
            yield f"JPEGImages/{item.id}.jpg", _jpeg(item.image_bytes())
        ids.append(item.id)
    yield "labelmap.txt", labelmap.encode()
    yield f"ImageSets/Segmentation/{VOC_SUBSET}.txt", "".join(f"{i}\n" for i in ids).encode()


def export_files(images: Iterable[MaskedImage], classes: Sequence[str], cfg: ExportConfig,
                 image_url: ImageUrl | None = None) -> Iterator[tuple[str, bytes]]:
    """The export's files as ``(relative name, bytes)``, images and VOC's masks one at a time, as
    they are read; ``image_url`` builds Label Studio's image URLs (:func:`labelstudio_tasks`)."""
    if not classes or len(set(classes)) != len(classes) or len(classes) >= IGNORE_INDEX:
        raise ValueError(f"the class list must be non-empty, without duplicates and below {IGNORE_INDEX} classes "
                         f"(label maps are 8-bit, {IGNORE_INDEX} is ignore); got {len(classes)}: {list(classes)[:10]}")
    if cfg.format == "voc":
        yield from _voc_files(images, classes, cfg.images)
    elif cfg.format == "coco":
        yield from _coco_files(images, classes, cfg.images)
    else:
        yield "tasks.json", json.dumps(labelstudio_tasks(images, classes, cfg.image_url_prefix, image_url)).encode()
        yield "config.xml", labelstudio_config(classes).encode()


def write_export(images: Iterable[MaskedImage], classes: Sequence[str], cfg: ExportConfig,
                 out_dir: str | Path, image_url: ImageUrl | None = None) -> list[Path]:
    """Write the export under ``out_dir``; returns the files written."""
    written = []
    for name, data in export_files(images, classes, cfg, image_url):
        path = Path(out_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
    return written


def export_zip(images: Iterable[MaskedImage], classes: Sequence[str], cfg: ExportConfig,
               image_url: ImageUrl | None = None) -> bytes:
    """The export as one zip archive (what a download or a storage object holds)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in export_files(images, classes, cfg, image_url):
            archive.writestr(name, data)
    return buf.getvalue()
