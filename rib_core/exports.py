"""Pseudo-masks in the formats other tools read: COCO, Label Studio and PASCAL VOC.

A mask here is a label map: 0 background, ``i + 1`` for ``classes[i]``, 255 ignore (pixels the
refinement left undecided). The exports:

- ``coco``: ``annotations.json``, one annotation per class present in an image (all of that
  class's pixels in it, connected or not: a semantic mask has no instances), as an RLE made by
  pycocotools (``counts`` as text), with its area and bounding box; ``iscrowd`` 0. Categories are
  the class list with ids 1..N (the mask's values), images carry their file name and size.
- ``labelstudio``: ``tasks.json``, one task per image whose ``predictions`` hold one brush region
  per class present, encoded by the Label Studio SDK's own brush RLE encoder, and ``config.xml``,
  the labelling config those regions belong to (``BrushLabels`` named ``tag`` on ``image``).
- ``voc``: ``SegmentationClass/<id>.png`` (palette PNGs, the values above), ``classes.txt``
  (background first, one name per line) and ``ImageSets/Segmentation/train.txt`` (the ids).

Ignore pixels (255): COCO and Label Studio have no "ignore" label, so they are in no annotation
and no brush region (a reviewer sees them unlabelled). COCO images that have some also carry
``ignore_rle``, the RLE of those pixels: an extra field that COCO readers skip, kept so that the
export loses nothing. VOC keeps 255, as VOC's own masks do ("void").

Two sources: a manifest with masks (what ``rib refine`` writes: ``masks.jsonl``, or any manifest
whose records have a ``mask``), and a service job in storage (``<job>/images/<id>/meta.json``
with ``crf_mask.png`` and, with IRN, ``irn_mask.png``: the layout of :mod:`rib_core.artifacts`).
"""

from __future__ import annotations

import io
import json
import posixpath
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, get_args
from xml.sax.saxutils import quoteattr

import numpy as np
from pydantic import BaseModel, ConfigDict

from rib_core.artifacts import MARKER, PIPELINE_IMAGE_FILES, final_files, pipeline_key
from rib_core.classes import IGNORE_INDEX
from rib_core.datasets import Manifest, decode_mask, load_manifest, load_mask
from rib_core.storage import Storage, join_uri
from rib_core.visualize import PALETTE, label_png

ExportFormat = Literal["coco", "labelstudio", "voc"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)
# Label Studio names of the config's tags, used by the tasks' regions.
LS_BRUSH, LS_IMAGE = "tag", "image"
MODEL_VERSION = "rib"


class ExportConfig(BaseModel):
    """What to export to; the API and the CLI validate their arguments with it."""

    model_config = ConfigDict(extra="forbid")

    format: ExportFormat
    # Label Studio loads a task's image from a URL: with a prefix, a task's image is the prefix and
    # the image's file name (e.g. "/data/local-files/?d=images/" for files Label Studio serves);
    # without one, the image's path or s3:// URI as the source names it.
    image_url_prefix: str | None = None


@dataclass(frozen=True)
class MaskedImage:
    """One image and its pseudo-mask, read only when an export needs it."""

    id: str
    image: str  # the image's path or URI; its file name is what COCO and Label Studio show
    read_mask: Callable[[], np.ndarray]

    @property
    def file_name(self) -> str:
        return posixpath.basename(self.image.rstrip("/")) or self.id


def _checked_mask(item: MaskedImage, n_classes: int) -> np.ndarray:
    """The image's label map; refuses values that are no class of the list (a wrong class list)."""
    mask = np.asarray(item.read_mask())
    if mask.ndim != 2:
        raise ValueError(f"mask of {item.id!r} has shape {mask.shape}; a label map is H x W")
    values = np.unique(mask)
    bad = values[((values < 0) | (values > n_classes)) & (values != IGNORE_INDEX)]
    if bad.size:
        raise ValueError(f"mask of {item.id!r} has values {bad[:5].tolist()} that are no class: the class list "
                         f"has {n_classes} (values 1..{n_classes}, 0 background, {IGNORE_INDEX} ignore)")
    return mask.astype(np.uint8)


def _present(mask: np.ndarray) -> list[int]:
    """Class values in the mask, background and ignore left out, ascending."""
    return [int(v) for v in np.unique(mask) if 0 < v != IGNORE_INDEX]


def _coco_region(binary: np.ndarray) -> dict[str, Any]:
    """pycocotools' RLE of a binary mask (``counts`` as text, for JSON), its area and bounding box."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(binary.astype(np.uint8)))
    return {"segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": float(coco_mask.area(rle)), "bbox": [float(v) for v in coco_mask.toBbox(rle)]}


def coco_annotations(images: Iterable[MaskedImage], classes: Sequence[str]) -> dict[str, Any]:
    """The COCO annotations dict (module docstring); image and annotation ids count from 1."""
    out: dict[str, Any] = {
        "info": {"description": "RIB pseudo-masks", "version": "1.0"}, "licenses": [],
        "images": [], "annotations": [],
        "categories": [{"id": i + 1, "name": name, "supercategory": ""} for i, name in enumerate(classes)]}
    for image_id, item in enumerate(images, start=1):
        mask = _checked_mask(item, len(classes))
        entry = {"id": image_id, "file_name": item.file_name, "height": mask.shape[0], "width": mask.shape[1]}
        if (mask == IGNORE_INDEX).any():
            entry["ignore_rle"] = _coco_region(mask == IGNORE_INDEX)["segmentation"]
        out["images"].append(entry)
        for value in _present(mask):
            out["annotations"].append({"id": len(out["annotations"]) + 1, "image_id": image_id,
                                       "category_id": value, **_coco_region(mask == value), "iscrowd": 0})
    return out


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
                  to_name: str = LS_IMAGE) -> list[dict[str, Any]]:
    """One Label Studio brush region per value of ``labels`` (mask value -> label name) present in the
    label map ``mask``, with ids ``<region_id>-<value>``."""
    height, width = mask.shape
    return [{"id": f"{region_id}-{value}", "from_name": from_name, "to_name": to_name, "type": "brushlabels",
             "original_width": width, "original_height": height, "image_rotation": 0,
             "value": {"format": "rle", "rle": _brush_rle(mask == value), "brushlabels": [labels[value]]}}
            for value in _present(mask) if value in labels]


def labelstudio_tasks(images: Iterable[MaskedImage], classes: Sequence[str],
                      image_url_prefix: str | None = None) -> list[dict[str, Any]]:
    """Label Studio tasks with the masks as predictions, one brush region per class present."""
    tasks = []
    for item in images:
        regions = brush_regions(_checked_mask(item, len(classes)), dict(enumerate(classes, start=1)), item.id)
        url = item.image if image_url_prefix is None else image_url_prefix + item.file_name
        tasks.append({"data": {"image": url, "image_id": item.id},
                      "predictions": [{"model_version": MODEL_VERSION, "result": regions}]})
    return tasks


def _voc_files(images: Iterable[MaskedImage], classes: Sequence[str]) -> Iterator[tuple[str, bytes]]:
    ids = []
    for item in images:
        yield f"SegmentationClass/{item.id}.png", label_png(_checked_mask(item, len(classes)))
        ids.append(item.id)
    yield "classes.txt", "".join(f"{name}\n" for name in ("background", *classes)).encode()
    yield "ImageSets/Segmentation/train.txt", "".join(f"{i}\n" for i in ids).encode()


def export_files(images: Iterable[MaskedImage], classes: Sequence[str], cfg: ExportConfig,
                 ) -> Iterator[tuple[str, bytes]]:
    """The export's files as ``(relative name, bytes)``; VOC's masks one at a time, as they are read."""
    if not classes or len(set(classes)) != len(classes) or len(classes) >= IGNORE_INDEX:
        raise ValueError(f"the class list must be non-empty, without duplicates and below {IGNORE_INDEX} classes "
                         f"(label maps are 8-bit, {IGNORE_INDEX} is ignore); got {len(classes)}: {list(classes)[:10]}")
    if cfg.format == "voc":
        yield from _voc_files(images, classes)
    elif cfg.format == "coco":
        yield "annotations.json", json.dumps(coco_annotations(images, classes)).encode()
    else:
        yield "tasks.json", json.dumps(labelstudio_tasks(images, classes, cfg.image_url_prefix)).encode()
        yield "config.xml", labelstudio_config(classes).encode()


def write_export(images: Iterable[MaskedImage], classes: Sequence[str], cfg: ExportConfig,
                 out_dir: str | Path) -> list[Path]:
    """Write the export under ``out_dir``; returns the files written."""
    written = []
    for name, data in export_files(images, classes, cfg):
        path = Path(out_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
    return written


def manifest_masks(manifest: Manifest | str | Path, folder: str | None = None) -> tuple[list[str], list[MaskedImage]]:
    """The class list and the images of a manifest with masks, e.g. ``rib refine``'s ``masks.jsonl``.

    ``folder``: take ``<manifest's folder>/<folder>/<id>.png`` instead of the records' masks (e.g.
    ``crf`` for the seed + CRF masks next to ``masks.jsonl``). Refuses a manifest without masks.
    """
    m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest, verify_files=False)
    records = m.records if folder is not None else [r for r in m.records if r.mask is not None]
    if not records:
        raise ValueError("the manifest has no masks: export a manifest whose records have a 'mask' "
                         "(rib refine writes OUT/masks.jsonl) or name a mask folder")

    uris = {r.id: m.mask_uri(r) if folder is None else join_uri(m.base, f"{folder}/{r.id}.png") for r in records}
    return list(m.classes), [MaskedImage(r.id, m.image_uri(r), partial(load_mask, uris[r.id])) for r in records]


def results_masks(results: str | Path, masks: str = "masks") -> tuple[list[str], list[MaskedImage]]:
    """A ``rib refine`` output folder (its ``masks.jsonl``; ``masks`` names the mask folder: ``masks``
    the final pseudo-masks, ``crf`` seed + CRF, ``retrain_labels``, ...) or a manifest with masks."""
    path = Path(results)
    if path.is_dir():
        if not (path / "masks.jsonl").exists():
            raise FileNotFoundError(f"{path} has no masks.jsonl: give a rib refine output folder or a manifest")
        if not (path / masks).is_dir():
            raise FileNotFoundError(f"{path} has no mask folder {masks!r}")
        return manifest_masks(path / "masks.jsonl", None if masks == "masks" else masks)
    return manifest_masks(path)


def job_masks(storage: Storage, job_prefix: str, image_uris: Mapping[str, str] | None = None) -> list[MaskedImage]:
    """The finished images of a service job under ``job_prefix`` (``jobs/<job>``), in id order, with
    their final mask (IRN's when there is one, else seed + CRF's). ``image_uris`` (id -> the image's
    URI, from the job's request) gives the file names; without it an image is named by its id."""
    files: dict[str, set[str]] = {}
    base = f"{job_prefix.strip('/')}/images/" if job_prefix.strip("/") else "images/"
    for key in storage.list(base):
        image_id, _, name = key[len(base):].partition("/")
        files.setdefault(image_id, set()).add(name)

    uris = image_uris or {}
    return [MaskedImage(image_id, uris.get(image_id, image_id), partial(_stored_mask, storage, base + image_id + "/"
                                                                        + final_files(names)["mask"]))
            for image_id, names in sorted(files.items()) if MARKER in names]


def _stored_mask(storage: Storage, key: str) -> np.ndarray:
    return decode_mask(storage.get(key))


def export_zip(images: Iterable[MaskedImage], classes: Sequence[str], cfg: ExportConfig) -> bytes:
    """The export as one zip archive (what a download or a storage object holds)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in export_files(images, classes, cfg):
            archive.writestr(name, data)
    return buf.getvalue()


def pipeline_masks(storage: Storage, job_id: str, manifest: Manifest) -> list[MaskedImage]:
    """The images of a pipeline job (``manifest``, its data set) that have a final pseudo-mask in
    storage (``jobs/<job>/pipeline/refined/masks/<id>.png``), in the manifest's order."""
    present = set(storage.list(pipeline_key(job_id, "refined/masks") + "/"))
    keys = {r.id: pipeline_key(job_id, PIPELINE_IMAGE_FILES["mask"].format(id=r.id)) for r in manifest.records}
    return [MaskedImage(r.id, manifest.image_uri(r), partial(_stored_mask, storage, keys[r.id]))
            for r in manifest.records if keys[r.id] in present]


def export_job(storage: Storage, job_prefix: str, classes: Sequence[str], cfg: ExportConfig,
               image_uris: Mapping[str, str] | None = None, images: list[MaskedImage] | None = None) -> str:
    """Export a service job's masks as ``<job_prefix>/exports/<format>.zip`` in ``storage``; returns
    that key (``storage.url(key)`` gives a link). ``images``: these (e.g. :func:`pipeline_masks`)
    instead of the bulk job's finished images. ValueError when there is no finished image."""
    images = job_masks(storage, job_prefix, image_uris) if images is None else images
    if not images:
        raise ValueError(f"no finished image under {job_prefix!r}: nothing to export yet")
    key = f"{job_prefix.strip('/')}/exports/{cfg.format}.zip"
    storage.put(key, export_zip(images, classes, cfg), "application/zip")
    return key
