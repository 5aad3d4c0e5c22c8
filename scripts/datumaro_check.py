"""Datumaro (what CVAT imports with) reads a COCO and a VOC export of ``rib export`` as they are.

Datumaro does not install beside this project's pins (docs/EXPORTS.md), so this runs in an
environment of its own, importing nothing from the project::

    python3 -m venv /tmp/dm && /tmp/dm/bin/pip install datumaro
    /tmp/dm/bin/python scripts/datumaro_check.py COCO_DIR VOC_DIR CLASS [CLASS ...]

It checks that both imports name the classes given (VOC's with ``background`` first), that every
item has its image, that every COCO mask carries a score in [0, 1], and that the VOC masks
Datumaro builds paint back to the export's own PNGs (255, "void", left out). Exit status 1 on
the first difference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from datumaro.components.annotation import AnnotationType, Mask
from datumaro.components.dataset import Dataset
from PIL import Image


def check(coco_dir: str, voc_dir: str, classes: list[str]) -> list[str]:
    """What differs from what the exports promise (empty when nothing)."""
    problems = []
    for path, fmt, expected in ((coco_dir, "coco", classes), (voc_dir, "voc_segmentation", ["background", *classes])):
        dataset = Dataset.import_from(path, fmt)
        labels = [label.name for label in dataset.categories()[AnnotationType.label]]
        items = list(dataset)
        print(f"{fmt}: {len(items)} items, labels {labels}")
        if labels != expected:
            problems.append(f"{fmt}: labels {labels}, expected {expected}")
        for item in items:
            masks = [a for a in item.annotations if isinstance(a, Mask)]
            if item.media is None or not item.media.has_data:
                problems.append(f"{fmt}: {item.id} has no image")
            if fmt == "coco" and not all(0 <= a.attributes.get("score", -1) <= 1 for a in masks):
                problems.append(f"coco: {item.id} has a mask without a score in [0, 1]")
            if fmt == "voc_segmentation":
                truth = np.asarray(Image.open(Path(voc_dir) / "SegmentationClass" / f"{item.id}.png"))
                painted = np.zeros_like(truth)
                for a in masks:
                    painted[a.image.astype(bool)] = a.label
                if not (painted[truth != 255] == truth[truth != 255]).all():
                    problems.append(f"voc: {item.id}'s masks differ from its PNG")
    return problems


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    found = check(sys.argv[1], sys.argv[2], sys.argv[3:])
    print("\n".join(found) or "ok: both exports import with their class names, images and masks")
    sys.exit(1 if found else 0)
