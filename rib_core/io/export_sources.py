"""The masks an export is made of, and where they come from; the job export stored next to the job.

Two sources: a manifest with masks (what ``rib refine`` writes: ``masks.jsonl``, or any manifest
whose records have a ``mask``), and a service job in storage (``<job>/images/<id>/meta.json``
with ``crf_mask.png``, ``map.npz`` and, with IRN, ``irn_mask.png``: the layout of
:mod:`rib_core.io.artifacts`).

The formats themselves are :mod:`rib_core.io.exports`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import numpy as np

from rib_core.data.datasets import Manifest, decode_mask, load_manifest, load_mask
from rib_core.io.artifacts import MAP_NPZ, MARKER, PIPELINE_IMAGE_FILES, final_files, pipeline_key
from rib_core.io.exports import ExportConfig, export_zip
from rib_core.io.localization_map import LocalizationMap
from rib_core.io.masked_image import ImageUrl, MaskedImage
from rib_core.io.storage import S3Storage, Storage, is_s3_uri, join_uri, read_bytes, split_s3_uri


def presigned_image_url(storage: Storage, expires_s: int = 3600) -> ImageUrl:
    """A URL builder for Label Studio's tasks: an ``s3://`` image becomes a presigned GET URL made by
    ``storage``'s clients (the public one signs: the host users reach), anything else stays as it
    is. Presigned URLs expire; for tasks kept longer, connect the bucket to Label Studio as source
    storage and keep the ``s3://`` URIs, which it opens itself."""
    def url(item: MaskedImage) -> str:
        if not (is_s3_uri(item.image) and isinstance(storage, S3Storage)):
            return item.image
        bucket, key = split_s3_uri(item.image)
        return S3Storage(bucket, client=storage.client, public_client=storage.public_client).url(key, expires_s)

    return url


def _uri_reader(storage: Storage) -> Callable[[str], bytes]:
    """Reads an image URI with the storage's S3 client (its endpoint and credentials), as workers read them."""
    return partial(read_bytes, client=storage.client) if isinstance(storage, S3Storage) else read_bytes


def manifest_masks(manifest: Manifest | str | Path, folder: str | None = None, maps: str | None = None,
                   ) -> tuple[list[str], list[MaskedImage]]:
    """The class list and the images of a manifest with masks, e.g. ``rib refine``'s ``masks.jsonl``.

    ``folder``: take ``<manifest's folder>/<folder>/<id>.png`` instead of the records' masks (e.g.
    ``crf`` for the seed + CRF masks next to ``masks.jsonl``). ``maps``: the folder of the maps the
    masks came from (``<id>.npz``), which score the regions. Refuses a manifest without masks.
    """
    m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest, verify_files=False)
    records = m.records if folder is not None else [r for r in m.records if r.mask is not None]
    if not records:
        raise ValueError("the manifest has no masks: export a manifest whose records have a 'mask' "
                         "(rib refine writes OUT/masks.jsonl) or name a mask folder")

    uris = {r.id: m.mask_uri(r) if folder is None else join_uri(m.base, f"{folder}/{r.id}.png") for r in records}
    return list(m.classes), [
        MaskedImage(r.id, m.image_uri(r), partial(load_mask, uris[r.id]),
                    None if maps is None else partial(_map_at, join_uri(maps, f"{r.id}.npz"))) for r in records]


def _map_at(uri: str) -> LocalizationMap:
    return LocalizationMap.from_bytes(read_bytes(uri))


def results_masks(results: str | Path, masks: str = "masks", maps: str | None = None,
                  ) -> tuple[list[str], list[MaskedImage]]:
    """A ``rib refine`` output folder (its ``masks.jsonl``; ``masks`` names the mask folder: ``masks``
    the final pseudo-masks, ``crf`` seed + CRF, ``retrain_labels``, ...) or a manifest with masks;
    ``maps``: the maps folder ``rib refine`` was given (the scores)."""
    path = Path(results)
    if maps is not None and not Path(maps).is_dir():
        raise FileNotFoundError(f"no maps folder {maps}: give the folder of <id>.npz maps the masks came from")
    if path.is_dir():
        if not (path / "masks.jsonl").exists():
            raise FileNotFoundError(f"{path} has no masks.jsonl: give a rib refine output folder or a manifest")
        if not (path / masks).is_dir():
            raise FileNotFoundError(f"{path} has no mask folder {masks!r}")
        return manifest_masks(path / "masks.jsonl", None if masks == "masks" else masks, maps)
    return manifest_masks(path, maps=maps)


def _unnamed_image(image_id: str) -> bytes:
    raise FileNotFoundError(f"the job's request, which names image {image_id!r}, was not given")


def job_masks(storage: Storage, job_prefix: str, image_uris: Mapping[str, str] | None = None) -> list[MaskedImage]:
    """The finished images of a service job under ``job_prefix`` (``jobs/<job>``), in id order, with
    their final mask (IRN's when there is one, else seed + CRF's) and map. ``image_uris`` (id -> the
    image's URI, from the job's request) gives the file names and the images; without it an image
    is named by its id and an export with images refuses it."""
    files: dict[str, set[str]] = {}
    base = f"{job_prefix.strip('/')}/images/" if job_prefix.strip("/") else "images/"
    for key in storage.list(base):
        image_id, _, name = key[len(base):].partition("/")
        files.setdefault(image_id, set()).add(name)

    uris, read = image_uris or {}, _uri_reader(storage)
    return [MaskedImage(image_id, uris.get(image_id, image_id),
                        partial(_stored_mask, storage, f"{base}{image_id}/{final_files(names)['mask']}"),
                        partial(_stored_map, storage, f"{base}{image_id}/{MAP_NPZ}") if MAP_NPZ in names else None,
                        partial(read, uris[image_id]) if image_id in uris else partial(_unnamed_image, image_id))
            for image_id, names in sorted(files.items()) if MARKER in names]


def _stored_mask(storage: Storage, key: str) -> np.ndarray:
    return decode_mask(storage.get(key))


def _stored_map(storage: Storage, key: str) -> LocalizationMap:
    return LocalizationMap.from_bytes(storage.get(key))


def pipeline_masks(storage: Storage, job_id: str, manifest: Manifest) -> list[MaskedImage]:
    """The images of a pipeline job (``manifest``, its data set) that have a final pseudo-mask in
    storage (``jobs/<job>/pipeline/refined/masks/<id>.png``), in the manifest's order, with their
    maps (``maps/<id>.npz``)."""
    present = set(storage.list(pipeline_key(job_id, "refined/masks") + "/"))
    present |= set(storage.list(pipeline_key(job_id, "maps") + "/"))
    read = _uri_reader(storage)

    def key(role: str, image_id: str) -> str:
        return pipeline_key(job_id, PIPELINE_IMAGE_FILES[role].format(id=image_id))

    return [MaskedImage(r.id, manifest.image_uri(r), partial(_stored_mask, storage, key("mask", r.id)),
                        partial(_stored_map, storage, key("map", r.id)) if key("map", r.id) in present else None,
                        partial(read, manifest.image_uri(r)))
            for r in manifest.records if key("mask", r.id) in present]


def export_job(storage: Storage, job_prefix: str, classes: Sequence[str], cfg: ExportConfig,
               image_uris: Mapping[str, str] | None = None, images: list[MaskedImage] | None = None,
               image_url: ImageUrl | None = None) -> str:
    """Export a service job's masks as ``<job_prefix>/exports/<format>.zip`` in ``storage``; returns
    that key (``storage.url(key)`` gives a link). ``images``: these (e.g. :func:`pipeline_masks`)
    instead of the bulk job's finished images; ``image_url``: Label Studio's image URLs (e.g.
    :func:`presigned_image_url`). ValueError when there is no finished image or an image to copy
    cannot be read."""
    images = job_masks(storage, job_prefix, image_uris) if images is None else images
    if not images:
        raise ValueError(f"no finished image under {job_prefix!r}: nothing to export yet")
    key = f"{job_prefix.strip('/')}/exports/{cfg.format}.zip"
    storage.put(key, export_zip(images, classes, cfg, image_url), "application/zip")
    return key
