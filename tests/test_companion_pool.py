"""The companion pool as an index (issue 23): images read on demand into a cache bounded in bytes,
prefetched a step ahead, the same draws and bytes as a pool decoded whole, one pool per data set
per process, and s3:// images fetched once through the disk cache. Real demo images, real moto S3;
no training (an untrained ResNet-18 where a classifier is needed)."""

from __future__ import annotations

import itertools
import os
import random
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from rib_core.config.rib_config import RibConfig
from rib_core.data.datasets import Manifest, ManifestRecord, load_image, load_manifest
from rib_core.jobs.stages import CLASSIFIERS, maps_stage
from rib_core.rib.companions import POOLS, CompanionPool, DeviceCompanions
from rib_core.training.checkpoints import save_classifier
from rib_core.training.networks import CamNet
from tests.service_stack import moto_s3, s3, upload_dataset

KEYS = [0, 3]      # the target's classes: companions are drawn among images with neither
STEPS = 12
IMAGE_BYTES = 64 * 64 * 3  # a demo scene decoded


def decoded_whole(manifest: Manifest) -> CompanionPool:
    """The pool as it was before issue 23: every image decoded up front, held as arrays."""
    images = [load_image(manifest.image_uri(r)) for r in manifest.records]
    return CompanionPool(images, manifest.label_matrix(), [r.id for r in manifest.records], manifest.classes)


def test_lazy_pool_gives_the_bytes_of_a_pool_decoded_whole(demo):
    """Same seed, same batches: the host (PIL) path through the prefetch thread, and the batched
    engine's device crops, with a cache so small that images are evicted and decoded again."""
    eager = decoded_whole(demo.train)
    lazy = CompanionPool.from_manifest(demo.train, cache_bytes=8 * IMAGE_BYTES)
    assert len(lazy.cache) == 0  # building the index decodes nothing
    args = (KEYS, 5, 48, (40, 80))
    ahead = list(lazy.ahead(lazy.batches(*args, random.Random(3)), STEPS))  # made on the prefetch thread
    assert len(ahead) == STEPS
    for got, want in zip(ahead, eager.batches(*args, random.Random(3)), strict=False):  # eager's are endless
        assert got[0].shape == (5, 3, 48, 48)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert lazy.cache.decodes > len(lazy.cache)  # images were evicted and read again
    lazy_draws = [lazy.draws(KEYS, 3, 48, (40, 80), random.Random(s)) for s in (5, 6)]
    eager_draws = [eager.draws(KEYS, 3, 48, (40, 80), random.Random(s)) for s in (5, 6)]
    on_device = [DeviceCompanions(p, torch.device("cpu")) for p in (lazy, eager)]
    for _ in range(STEPS):
        steps = [[next(d) for d in draws] for draws in (lazy_draws, eager_draws)]
        assert steps[0] == steps[1]  # the same companions and crop draws
        chosen, crops = [c for c, _ in steps[0]], [d for _, d in steps[0]]
        (x_lazy, y_lazy), (x_eager, y_eager) = (d.crops(chosen, crops) for d in on_device)
        assert x_lazy.shape == (2, 3, 3, 48, 48)
        assert torch.equal(x_lazy, x_eager) and torch.equal(y_lazy, y_eager)
        assert not y_lazy[..., KEYS].any()


def test_prefetch_runs_on_a_thread_and_stops_at_the_steps_asked_for(demo):
    made: list[str] = []

    def steps() -> Iterator[int]:
        for n in itertools.count():
            made.append(threading.current_thread().name)
            yield n

    pool = CompanionPool.from_manifest(demo.train)
    assert list(pool.ahead(steps(), 3)) == [0, 1, 2]
    assert len(made) == 3 and threading.current_thread().name not in made
    pool.prefetch = False
    made.clear()
    assert list(pool.ahead(steps(), 2)) == [0, 1] and made == [threading.current_thread().name] * 2


@pytest.mark.parametrize("bound_images", [1, 3, 7])
def test_the_cache_never_exceeds_its_bound(demo, bound_images):
    bound = bound_images * IMAGE_BYTES + IMAGE_BYTES // 2
    pool = CompanionPool.from_manifest(demo.train, cache_bytes=bound)
    drawn: set[int] = set()
    for step, (chosen, _) in enumerate(pool.ahead(pool.draws([1], 4, 32, (24, 48), random.Random(0)), 40)):
        drawn.update(chosen)
        for i in chosen:
            pool.image(i)
        assert 0 < pool.cache.nbytes <= bound, (step, pool.cache.nbytes, bound)
        assert len(pool.cache) <= bound_images
    assert len(drawn) > 2 * bound_images and pool.cache.decodes > len(pool.cache)


def test_an_image_over_the_bound_is_read_but_not_kept(demo):
    pool = CompanionPool.from_manifest(demo.train, cache_bytes=IMAGE_BYTES - 1)
    assert pool.image(0).shape == (64, 64, 3) and pool.size(0) == (64, 64)
    assert pool.cache.nbytes == 0 and len(pool.cache) == 0


def test_two_chunks_of_a_data_set_build_its_pool_once(demo, tmp_path):
    """Two maps_stage calls (two chunks of one pipeline) on the same data set, the second with the
    manifest read again from its file, share one pool; another data set gets its own."""
    torch.manual_seed(0)
    classifier = tmp_path / "classifier.pth"
    save_classifier(CamNet(len(demo.train.classes), "resnet18"), demo.train.classes, classifier)
    cfg = RibConfig(iterations=1, companions=2, crop_size=32, resize_long=(32, 48), map_scales=(1.0,),
                    loss_scales=(1.0,))
    ids = [r.id for r in demo.train.records[:4]]
    POOLS.clear()
    before, loads = POOLS.builds, CLASSIFIERS.loads
    maps_stage(tmp_path / "work", demo.train, ids[:2], classifier, cfg)
    saved = tmp_path / "train.jsonl"
    absolute = [ManifestRecord(r.id, demo.train.image_uri(r), r.labels) for r in demo.train.records]
    Manifest(demo.train.classes, absolute, str(tmp_path)).save(saved)  # elsewhere, the same images
    maps_stage(tmp_path / "work", load_manifest(saved), ids[2:], classifier, cfg)
    assert POOLS.builds - before == 1 and CLASSIFIERS.loads - loads == 1  # the classifier too, once
    assert sorted(p.stem for p in (tmp_path / "work" / "maps").glob("*.npz")) == sorted(ids)
    other = demo.train.subset([r.id for r in demo.train.records[:100]])
    maps_stage(tmp_path / "other", other, ids[:1], classifier, cfg)
    assert POOLS.builds - before == 2
    retrained = CamNet(len(demo.train.classes), "resnet18")
    save_classifier(retrained, demo.train.classes, classifier)  # the file rewritten: loaded again
    os.utime(classifier, ns=(1, 1))
    maps_stage(tmp_path / "again", other, ids[:1], classifier, cfg)
    assert CLASSIFIERS.loads - loads == 2
    model = CLASSIFIERS.get(classifier, demo.train.classes)
    pairs = zip(model.state_dict().values(), retrained.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)  # and RIB's runs left the shared model as loaded


def test_s3_images_are_fetched_once_through_the_disk_cache(demo, tmp_path, monkeypatch):
    """A tiny memory cache (every image evicted and read again) over moto's S3: each object is
    fetched once per disk-cache folder, by this pool and by a second pool of the same folder."""
    records = 30
    with moto_s3() as endpoint:
        for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        client = s3(endpoint)
        client.create_bucket(Bucket="pool")
        uri = upload_dataset(client, "pool", "train", demo.train, records=records)
        manifest = load_manifest(uri, verify_files=False)
        assert manifest.image_uri(manifest.records[0]).startswith("s3://pool/train/")
        eager = decoded_whole(demo.train.subset([r.id for r in manifest.records]))
        pool = CompanionPool.from_manifest(manifest, cache_bytes=2 * IMAGE_BYTES, disk_cache=tmp_path / "disk")
        args = ([2], 4, 32, (24, 48))  # 21 steps of 4: every candidate drawn several times
        for got, want in zip(pool.ahead(pool.batches(*args, random.Random(1)), 21),
                             eager.batches(*args, random.Random(1)), strict=False):
            assert torch.equal(got[0], want[0])
        candidates = set(np.flatnonzero(~pool.labels[:, 2]).tolist())
        assert pool.cache.decodes > len(candidates)          # evicted images were read again...
        assert pool.reader.remote_reads == len(candidates)   # ...from the disk, not from S3
        again = CompanionPool.from_manifest(manifest, cache_bytes=2 * IMAGE_BYTES, disk_cache=tmp_path / "disk")
        for i in candidates:
            np.testing.assert_array_equal(again.image(i), pool.image(i))
        assert again.reader.remote_reads == 0
