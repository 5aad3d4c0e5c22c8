"""Write our manifest from the public datasets' own layouts (nothing is downloaded).

PASCAL VOC 2012 (+ SBD): image ids from a list file (IRN's ``train_aug.txt``, ``train.txt`` or
``val.txt``, one ``2007_000032``-style id per line), labels from the devkit's ``Annotations`` XML
(or from IRN's ``cls_labels.npy``), ground truth from ``SegmentationClassAug`` or
``SegmentationClass`` where it exists. COCO 2014: ``instances_*.json``; ground-truth masks are
rendered from the polygon annotations when asked for.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar
from xml.etree import ElementTree

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from rib_core.data.classes import COCO_CLASSES, VOC_CLASSES
from rib_core.data.datasets import Manifest, ManifestRecord
from rib_core.io.visualize import label_png


def _voc_labels_from_xml(root: Path, image_id: str) -> list[str]:
    tree = ElementTree.parse(root / "Annotations" / f"{image_id}.xml")
    names = {el.text.strip() for el in tree.iter("name") if el.text}
    return [c for c in VOC_CLASSES if c in names]


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only: a pickle naming any other callable (which
    is how a pickle runs code) is refused."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        [(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")]
        + [("numpy", "ndarray"), ("numpy", "dtype")])

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a label table")
        return super().find_class(module, name)


def _voc_labels_from_npy(path: Path) -> dict[str, list[str]]:
    """IRN's cls_labels.npy: a pickled {int id: 20-vector} dict, read without running anything in it."""
    with path.open("rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        _, _, dtype = read_header(f)
        if not dtype.hasobject:
            raise ValueError(f"{path} is not IRN's cls_labels.npy (an array of {dtype}, not a pickled dict)")
        try:
            table = _ArraysOnly(f).load().item()
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path} is not IRN's cls_labels.npy: {e}") from e
    out = {}
    for key, vec in table.items():
        s = str(int(key)) if not isinstance(key, str) else key.replace("_", "")
        out[f"{s[:4]}_{s[4:]}"] = [VOC_CLASSES[i] for i in np.flatnonzero(np.asarray(vec) > 0)]
    return out


def import_voc(devkit: str | os.PathLike[str], id_list: str | os.PathLike[str], out: str | os.PathLike[str],
               cls_labels: str | os.PathLike[str] | None = None,
               mask_dirs: Sequence[str] = ("SegmentationClassAug", "SegmentationClass")) -> Manifest:
    """Manifest for the ids in ``id_list`` of a VOC2012 devkit folder (``.../VOC2012``).

    Images without any of the 20 classes are left out (RIB needs at least one label). An image's
    ground truth is its PNG in the first of ``mask_dirs`` that has one; ``("SegmentationClass",)``
    keeps VOC's own masks only, which is what the paper scores on (SBD's have no 255 borders).
    """
    root = Path(devkit).resolve()
    if not (root / "JPEGImages").is_dir():
        raise FileNotFoundError(f"{root} has no JPEGImages folder: pass the VOC2012 folder of the devkit")
    ids = [ln.split()[0] for ln in Path(id_list).read_text().splitlines() if ln.strip()]
    table = _voc_labels_from_npy(Path(cls_labels)) if cls_labels else None
    records = []
    for image_id in tqdm(ids, desc="voc", unit="img"):
        labels = table[image_id] if table is not None else _voc_labels_from_xml(root, image_id)
        if not labels:
            continue
        mask = next((f"{d}/{image_id}.png" for d in mask_dirs
                     if (root / d / f"{image_id}.png").exists()), None)
        records.append(ManifestRecord(image_id, f"JPEGImages/{image_id}.jpg", tuple(labels), mask))
    manifest = Manifest(list(VOC_CLASSES), records, str(root))
    _save_relative(manifest, Path(out))
    return manifest


def _save_relative(manifest: Manifest, out: Path) -> None:
    """Write the manifest with paths made relative to its own folder (or absolute if elsewhere)."""
    base = Path(manifest.base)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)

    def rel(p: str | None) -> str | None:
        return None if p is None else os.path.relpath(base / p, out.parent)

    records = [ManifestRecord(r.id, rel(r.image) or r.image, r.labels, rel(r.mask)) for r in manifest.records]
    Manifest(manifest.classes, records, str(out.parent)).save(out)


def _render_coco_mask(size: tuple[int, int], anns: Sequence[dict], cat_index: dict[int, int]) -> np.ndarray:
    """Label map from polygon annotations, larger objects first so that small ones stay visible.

    Crowd (RLE) annotations are not rendered.
    """
    h, w = size
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for ann in sorted(anns, key=lambda a: -a.get("area", 0)):
        if ann.get("iscrowd") or not isinstance(ann.get("segmentation"), list):
            continue
        for poly in ann["segmentation"]:
            if len(poly) >= 6:
                draw.polygon(list(zip(poly[0::2], poly[1::2], strict=True)), fill=cat_index[ann["category_id"]] + 1)
    return np.asarray(canvas)


def import_coco(image_dir: str | os.PathLike[str], annotations: str | os.PathLike[str],
                out: str | os.PathLike[str], masks_dir: str | os.PathLike[str] | None = None) -> Manifest:
    """Manifest for a COCO 2014 split; with ``masks_dir``, ground-truth masks are written there."""
    data = json.loads(Path(annotations).read_text())
    cats = sorted(data["categories"], key=lambda c: c["id"])
    names = [c["name"] for c in cats]
    if names != list(COCO_CLASSES):
        raise ValueError(f"{annotations} does not list the 80 COCO categories in the usual order")
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    image_dir = Path(image_dir).resolve()
    if masks_dir:
        Path(masks_dir).mkdir(parents=True, exist_ok=True)
    records = []
    for img in tqdm(data["images"], desc="coco", unit="img"):
        anns = by_image.get(img["id"], [])
        labels = sorted({cat_index[a["category_id"]] for a in anns})
        if not labels:
            continue
        image_id = Path(img["file_name"]).stem
        mask = None
        if masks_dir:
            mask_path = Path(masks_dir).resolve() / f"{image_id}.png"
            mask_path.write_bytes(label_png(_render_coco_mask((img["height"], img["width"]), anns, cat_index)))
            mask = str(mask_path)
        records.append(ManifestRecord(image_id, str(image_dir / img["file_name"]), tuple(names[i] for i in labels),
                                      mask))
    manifest = Manifest(names, records, "/")
    _save_relative(manifest, Path(out))
    return manifest
