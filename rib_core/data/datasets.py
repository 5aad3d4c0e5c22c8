"""One dataset format for every stage: a JSON Lines manifest with a class list.

The first line is a header, the others one image each::

    {"format": "rib-manifest", "version": 1, "classes": ["aeroplane", "bicycle", ...]}
    {"id": "2007_000032", "image": "JPEGImages/2007_000032.jpg", "labels": ["aeroplane", "person"],
     "mask": "SegmentationClass/2007_000032.png"}

``image`` and ``mask`` are paths relative to the manifest, absolute paths or s3:// URIs. ``mask``
(optional) is a label PNG: 0 background, i + 1 for ``classes[i]``, 255 ignore. Validation reports
every bad line at once so that a user fixes a manifest in one go.

Torch-free (manifests, records, image decoding): the API process imports it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from rib_core.io.storage import is_s3_uri, join_uri, parent_uri, read_bytes, uri_exists

MANIFEST_FORMAT = "rib-manifest"
MANIFEST_VERSION = 1
MAX_IMAGE_PIXELS = 40_000_000  # refuse decompression bombs (about 7,000 x 5,700)
MAX_CLASSES = 254  # label masks are 8-bit: 0 background, 1-254 classes, 255 ignore


class ManifestError(ValueError):
    """A manifest that cannot be used; ``errors`` lists ``(line number, message)`` pairs."""

    def __init__(self, errors: list[tuple[int, str]]) -> None:
        self.errors = errors
        shown = "; ".join(f"line {n}: {m}" for n, m in errors[:20])
        more = f" (and {len(errors) - 20} more)" if len(errors) > 20 else ""
        super().__init__(f"invalid manifest: {shown}{more}")


class ImageError(ValueError):
    """An image file that cannot be decoded, or is too large to decode safely."""


class ImageTooLargeError(ImageError):
    """An image over the pixel limit (a decompression bomb, or just too big)."""


@dataclass(frozen=True)
class ManifestRecord:
    id: str
    image: str
    labels: tuple[str, ...]
    mask: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "image": self.image, "labels": list(self.labels)}
        if self.mask is not None:
            d["mask"] = self.mask
        return d


@dataclass
class Manifest:
    classes: list[str]
    records: list[ManifestRecord]
    base: str = "."  # folder or s3:// prefix that relative paths resolve against
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {r.id: i for i, r in enumerate(self.records)}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> ManifestRecord:
        return self.records[i]

    def by_id(self, image_id: str) -> ManifestRecord:
        return self.records[self._index[image_id]]

    def image_uri(self, r: ManifestRecord) -> str:
        return join_uri(self.base, r.image)

    def mask_uri(self, r: ManifestRecord) -> str | None:
        return None if r.mask is None else join_uri(self.base, r.mask)

    def label_indices(self, r: ManifestRecord) -> list[int]:
        return sorted(self.classes.index(c) for c in r.labels)

    def label_vector(self, r: ManifestRecord) -> np.ndarray:
        """Multi-hot float32 vector over ``classes``."""
        v = np.zeros(len(self.classes), np.float32)
        v[self.label_indices(r)] = 1.0
        return v

    def label_matrix(self) -> np.ndarray:
        """[N, C] multi-hot bool labels of every record, in one pass."""
        index = {c: i for i, c in enumerate(self.classes)}
        out = np.zeros((len(self.records), len(self.classes)), bool)
        for n, r in enumerate(self.records):
            out[n, [index[c] for c in r.labels]] = True
        return out

    @cached_property
    def digest(self) -> str:
        """SHA-256 of the class list and every record with its image resolved: the data set's
        identity (equal digests name the same images with the same labels, in the same order).
        Computed once per manifest object (a manifest is not changed once made)."""
        rows = [json.dumps(self.classes)] + [json.dumps([r.id, self.image_uri(r), r.labels]) for r in self.records]
        return hashlib.sha256("\n".join(rows).encode()).hexdigest()

    def subset(self, ids: Iterable[str]) -> Manifest:
        return Manifest(self.classes, [self.by_id(i) for i in ids], self.base)

    def dumps(self) -> str:
        header = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "classes": self.classes}
        lines = [json.dumps(header)] + [json.dumps(r.to_json()) for r in self.records]
        return "\n".join(lines) + "\n"

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(self.dumps())


def parse_records(items: Sequence[Any], classes: Sequence[str], first_line: int = 2,
                  line_numbers: Sequence[int] | None = None) -> tuple[list[ManifestRecord], list[tuple[int, str]]]:
    """Validate decoded record objects in one pass (linear in their number); returns the good records
    and per-line errors. Lines count from ``first_line``, or are ``line_numbers``, one per item."""
    known = set(classes)
    seen: set[str] = set()
    records, errors = [], []
    numbers = line_numbers if line_numbers is not None else range(first_line, first_line + len(items))
    for n, item in zip(numbers, items, strict=True):
        if not isinstance(item, dict):
            errors.append((n, "expected a JSON object with id, image and labels"))
            continue
        missing = [k for k in ("id", "image", "labels") if k not in item]
        if missing:
            errors.append((n, f"missing field(s) {', '.join(missing)}"))
            continue
        image_id, image, labels, mask = item["id"], item["image"], item["labels"], item.get("mask")
        if not isinstance(image_id, str) or not image_id or "/" in image_id or image_id in (".", ".."):
            errors.append((n, f"id must be a non-empty string without '/', got {image_id!r}"))
            continue
        if image_id in seen:
            errors.append((n, f"duplicate id {image_id!r}"))
            continue
        if not isinstance(image, str) or not image:
            errors.append((n, f"image of {image_id!r} must be a path or s3:// URI"))
            continue
        if mask is not None and not isinstance(mask, str):
            errors.append((n, f"mask of {image_id!r} must be a path or s3:// URI"))
            continue
        if not isinstance(labels, list) or not all(isinstance(c, str) for c in labels):
            errors.append((n, f"labels of {image_id!r} must be a list of class names"))
            continue
        if not labels:
            errors.append((n, f"{image_id!r} has an empty label set; RIB needs at least one class"))
            continue
        unknown = sorted(set(labels) - known)
        if unknown:
            errors.append((n, f"{image_id!r} has unknown class(es) {unknown}; known: {sorted(known)}"))
            continue
        seen.add(image_id)
        records.append(ManifestRecord(image_id, image, tuple(dict.fromkeys(labels)), mask))
    return records, errors


def class_list_errors(classes: Sequence[str]) -> list[str]:
    """What is wrong with a class list: masks are 8-bit (0 background, ``i + 1`` a class, 255
    ignore), so at most :data:`MAX_CLASSES`; names are non-empty printable text, each once."""
    errors = []
    if len(classes) > MAX_CLASSES:
        errors.append(f"{len(classes)} classes; label masks are 8-bit, so at most {MAX_CLASSES} "
                      "(0 is background and 255 ignore)")
    bad = [c for c in classes if not c.strip() or not c.isprintable() or len(c) > 100]
    if bad:
        errors.append(f"class names must be 1-100 printable characters (no newline or control character); "
                      f"fix {bad[:5]!r}")
    if len(set(classes)) != len(classes):
        errors.append("the class list has duplicates")
    return errors


def parse_manifest(text: str, base: str = ".", classes: Sequence[str] | None = None) -> Manifest:
    """Parse manifest text. ``classes`` is needed only when the text has no header line."""
    lines = [(n, ln) for n, ln in enumerate(text.splitlines(), start=1) if ln.strip()]
    errors: list[tuple[int, str]] = []
    decoded: list[tuple[int, Any]] = []
    for n, ln in lines:
        try:
            decoded.append((n, json.loads(ln)))
        except json.JSONDecodeError as e:
            errors.append((n, f"not valid JSON ({e.msg} at column {e.colno})"))
    if decoded and isinstance(decoded[0][1], dict) and "classes" in decoded[0][1]:
        header = decoded.pop(0)[1]
        if header.get("format", MANIFEST_FORMAT) != MANIFEST_FORMAT:
            errors.append((1, f"format {header.get('format')!r} is not {MANIFEST_FORMAT!r}"))
        classes = header["classes"]
    if not classes or not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        header_hint = '{"format": "rib-manifest", "version": 1, "classes": [...]}'
        raise ManifestError([*errors, (1, f"no class list: the first line must be {header_hint}")])
    errors += [(1, e) for e in class_list_errors(classes)]
    records, bad = parse_records([item for _, item in decoded], classes, line_numbers=[n for n, _ in decoded])
    errors += bad
    if not records and not errors:
        errors.append((1, "the manifest lists no images"))
    if errors:
        raise ManifestError(sorted(errors))
    return Manifest(list(classes), records, base)


def check_files(manifest: Manifest) -> None:
    """Raise ManifestError naming every image or mask that does not exist."""
    errors = []
    for n, r in enumerate(manifest.records, start=2):
        for what, uri in (("image", manifest.image_uri(r)), ("mask", manifest.mask_uri(r))):
            if uri is not None and not uri_exists(uri):
                errors.append((n, f"{what} of {r.id!r} not found: {uri}"))
    if errors:
        raise ManifestError(errors)


def load_manifest(uri: str | os.PathLike[str], verify_files: bool = True) -> Manifest:
    """Read and validate a manifest from a path or an s3:// URI."""
    uri = str(uri)
    try:
        text = read_bytes(uri).decode("utf-8")
    except FileNotFoundError as e:
        raise ManifestError([(0, f"manifest not found: {uri}")]) from e
    except UnicodeDecodeError as e:
        raise ManifestError([(0, f"manifest {uri} is not UTF-8 text")]) from e
    manifest = parse_manifest(text, base=parent_uri(uri) if is_s3_uri(uri) else str(Path(uri).resolve().parent))
    if verify_files:
        check_files(manifest)
    return manifest


def median_long_side(manifest: Manifest, sample: int = 64) -> int:
    """The median long side (px) of up to ``sample`` images spread evenly over ``manifest``, read
    from their headers: the scale that size settings made for another data set must meet."""
    records = manifest.records[::max(1, len(manifest) // sample)][:sample]
    if not records:
        raise ValueError("the manifest lists no images")
    sides = []
    for r in records:
        with Image.open(io.BytesIO(read_bytes(manifest.image_uri(r)))) as im:
            sides.append(max(im.size))
    return int(np.median(sides))


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Bytes -> uint8 HxWx3 RGB. Refuses non-images, truncated files and decompression bombs."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageTooLargeError(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
            im.load()
            return np.asarray(im.convert("RGB"))
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own, far larger limit, hit before the size is known
        raise ImageTooLargeError(f"image is over {max_pixels} pixels, the limit") from e
    except UnidentifiedImageError as e:  # its message names the BytesIO object, not the data
        raise ImageError("not a readable image (no image format recognised)") from e
    except Exception as e:
        raise ImageError(f"not a readable image ({type(e).__name__}: {e})") from e


def decode_mask(data: bytes) -> np.ndarray:
    """A label PNG -> uint8 HxW of class indices (palette indices, not colours)."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("P", "L"):
            raise ImageError(f"a label mask must be a palette or greyscale PNG, not mode {im.mode}")
        return np.asarray(im)


def load_image(uri: str) -> np.ndarray:
    return decode_image(read_bytes(uri))


def load_mask(uri: str) -> np.ndarray:
    return decode_mask(read_bytes(uri))
