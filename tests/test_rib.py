"""RIB: loss, pooling, stopping, disjoint companions, weight isolation, and parity with a plain
reference of the official loop — on real demo images through a trained ResNet-18."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from rib_core.classifier.cam import LocalizationMap
from rib_core.config.rib_config import RibConfig
from rib_core.config.stage_configs import EvalConfig
from rib_core.data.datasets import load_image, load_mask
from rib_core.data.evaluation import sweep_seeds
from rib_core.jobs.pipeline import PipelineConfig, PseudoMaskPipeline
from rib_core.rib.batching import run_rib
from rib_core.rib.companions import CompanionPool
from rib_core.rib.objective import gap, gndrp
from rib_core.rib.process import RibRunner
from rib_core.training.augment import multiscale_flip_batches
from rib_core.training.checkpoints import load_classifier
from tests.rib_reference import gndp2d, reference_rib

SMALL = dict(crop_size=64, resize_long=(48, 96), companions=3)
# The paper's settings (K 10, lr 8e-6, 20 companions, GNDRP, margin 600 and the explosion rule)
# on the fixture's 64 px scenes, with small companion crops to keep it cheap.
PAPER = RibConfig(crop_size=32, resize_long=(32, 64))


@pytest.fixture(scope="module")
def setup(demo, classifier_path):
    model, _, _ = load_classifier(classifier_path)
    pool = CompanionPool.from_manifest(demo.train, limit=40)
    # Two-digit scenes are rare at 64 px (13 of 192 train images, none of the 16 val images). Take
    # one where the classifier's CAM is positive somewhere for both digits, so the stopping rules
    # have a map to look at.
    for record in (r for r in demo.train.records if len(r.labels) >= 2):
        image, keys = load_image(demo.train.image_uri(record)), demo.train.label_indices(record)
        with torch.no_grad():
            cam = model.cam(multiscale_flip_batches(image, (1.0,))[0])[0]
        if all(cam[k].max() > 0 for k in keys):
            return model, pool, image, keys
    raise AssertionError("the fixture classifier localises no two-digit training scene")


def test_gndrp_matches_official_loop_and_drops_discriminative_pixels():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 6, 7)
    labels = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.float32)
    ours = gndrp(x, labels, tau=0.4)
    assert torch.allclose(ours, gndp2d(x, labels, 0.4, per_image=True), atol=1e-6)
    assert torch.allclose(ours[:, 3], gap(x)[:, 3], atol=1e-6)  # class 3 is labelled nowhere: plain GAP
    # The paper's variant divides by the kept pixels only.
    kept = gndrp(x, labels, tau=0.4, denominator="kept")
    norm = x / x.amax(dim=(2, 3), keepdim=True)
    mask = norm[0, 0] < 0.4
    assert torch.isclose(kept[0, 0], x[0, 0][mask].mean(), atol=1e-6)


def test_loss_is_minus_the_raw_target_logits_over_loss_scales(setup):
    model, pool, image, keys = setup
    cfg = RibConfig(iterations=1, pooling="gap", companions=0, crop_size=64, resize_long=(48, 96))
    outcome = RibRunner(model, pool, cfg).run(image, keys)
    with torch.no_grad():
        batches = multiscale_flip_batches(image, (1.0, 1.5, 2.0))
        expected = sum(model.logits(b)[:, keys].sum() for b in batches).item()
    # no sigmoid, both flips, scales 1.0/1.5/2.0 (0.5 left out), labelled classes only
    assert outcome.target_logit_sums[0] == pytest.approx(expected, rel=1e-4, abs=1e-3)
    assert outcome.steps == 1


def test_rib_raises_target_logits(setup):
    model, pool, image, keys = setup
    cfg = RibConfig(iterations=3, lr=1e-4, pooling="gap", margin=1e9, explode_ratio=1.0, **SMALL)
    sums = RibRunner(model, pool, cfg).run(image, keys).target_logit_sums
    assert len(sums) == 3 and sums[2] > sums[0]


def test_margin_and_explosion_stop_early(setup):
    model, pool, image, keys = setup
    runner = RibRunner(model, pool, RibConfig(iterations=5, **SMALL))
    by_margin = runner.run(image, keys, RibConfig(iterations=5, margin=1e-3, **SMALL))
    assert (by_margin.stop_reason, by_margin.steps) == ("margin", 1)
    by_explosion = runner.run(image, keys, RibConfig(iterations=5, explode_ratio=1e-3, margin=1e9, **SMALL))
    assert (by_explosion.stop_reason, by_explosion.steps) == ("explosion", 1)
    full = runner.run(image, keys, RibConfig(iterations=4, margin=1e9, explode_ratio=1.0, **SMALL))
    assert (full.stop_reason, full.steps) == ("iterations", 4)


def test_companions_share_no_class_with_the_target(demo):
    pool = CompanionPool.from_manifest(demo.train)
    keys = [0, 3]
    allowed = pool.disjoint_indices(keys)
    assert len(allowed) and not pool.labels[allowed][:, keys].any()
    batches = pool.batches(keys, 8, 32, (24, 48), random.Random(1))
    for _ in range(4):
        imgs, labels = next(batches)
        assert imgs.shape == (8, 3, 32, 32)
        assert labels.shape == (8, len(pool.classes)) and not labels[:, keys].any()
        assert labels.sum(1).min() >= 1


def test_shared_weights_are_never_mutated_and_images_are_independent(setup, demo):
    model, pool, image, keys = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = RibConfig(iterations=2, lr=1e-3, margin=1e9, explode_ratio=1.0, **SMALL)
    runner = RibRunner(model, pool, cfg)
    other = demo.val.records[0]
    alone = runner.run(image, keys, seed=7).map.high_res
    runner.run(load_image(demo.val.image_uri(other)), demo.val.label_indices(other), seed=3)
    after_other = runner.run(image, keys, seed=7).map.high_res
    np.testing.assert_array_equal(alone, after_other)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"shared weight {k} changed"
    assert any(not torch.equal(v, before[k]) for k, v in runner.work.state_dict().items())


@pytest.mark.parametrize("pooling", ["gap", "gndrp"])
@pytest.mark.parametrize("stop", ["none", "margin", "explosion"])
def test_parity_with_official_structure(setup, pooling, stop):
    model, pool, image, keys = setup
    extra = {"none": dict(margin=1e9, explode_ratio=1.0), "margin": dict(margin=1e-3),
             "explosion": dict(margin=1e9, explode_ratio=1e-3)}[stop]
    cfg = RibConfig(iterations=3, lr=1e-4, pooling=pooling, **SMALL, **extra)  # 1e-3 overflows this net
    ours = RibRunner(model, pool, cfg).run(image, keys, seed=11)
    ref = reference_rib(model, pool, image, keys, cfg, seed=11)
    assert ours.stop_reason == ("iterations" if stop == "none" else stop)
    np.testing.assert_allclose(ours.map.high_res, ref["high_res"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours.map.cam, ref["cam"], rtol=1e-4, atol=1e-5)
    if stop == "none":  # the maps really moved away from the CAM of theta_0
        cam0 = RibRunner(model, pool, cfg).run(image, keys, RibConfig(iterations=1, margin=1e-9, **SMALL))
        assert not np.allclose(cam0.map.high_res, ours.map.high_res, atol=1e-3)


@pytest.fixture(scope="module")
def at_paper_settings(demo, classifier_path):
    """Three training scenes, the reference loop's maps and stops for each at the paper's settings."""
    model, _, _ = load_classifier(classifier_path)
    pool = CompanionPool.from_manifest(demo.train, limit=40)
    records = demo.train.records[:3]
    images = [load_image(demo.train.image_uri(r)) for r in records]
    keys = [demo.train.label_indices(r) for r in records]
    refs = [reference_rib(model, pool, im, k, PAPER, seed=j)
            for j, (im, k) in enumerate(zip(images, keys, strict=True))]
    print(f"\nreference at the paper's settings: {[(r['stop_reason'], r['steps']) for r in refs]}")
    return model, pool, images, keys, refs


def _assert_matches_reference(outcomes, refs, atol):
    stops = {(r["stop_reason"], r["steps"]) for r in refs}
    # the fixture's scenes exercise a full run and an explosion after an update
    assert ("iterations", PAPER.iterations) in stops and any(r == "explosion" and s > 0 for r, s in stops)
    for ours, ref in zip(outcomes, refs, strict=True):
        assert (ours.stop_reason, ours.steps) == (ref["stop_reason"], ref["steps"])
        np.testing.assert_allclose(ours.map.high_res, ref["high_res"], rtol=1e-4, atol=atol)
        np.testing.assert_allclose(ours.map.cam, ref["cam"], rtol=1e-4, atol=atol)


def test_parity_with_official_structure_at_paper_settings(at_paper_settings):
    model, pool, images, keys, refs = at_paper_settings
    runner = RibRunner(model, pool, PAPER)
    _assert_matches_reference([runner.run(im, k, seed=j) for j, (im, k) in enumerate(zip(images, keys, strict=True))],
                              refs, atol=1e-5)


def test_run_many_matches_the_official_structure_at_paper_settings(at_paper_settings):
    """The batched engine against the reference loop itself (not only against run), with images
    that stop at different steps in one batch; companions cropped on the host as the reference does."""
    model, pool, images, keys, refs = at_paper_settings
    together = RibRunner(model, pool, PAPER).run_many(images, keys, seeds=[0, 1, 2], device_crops=False)
    _assert_matches_reference(together, refs, atol=1e-4)


def test_fast_path_keeps_the_maps_and_the_seed_score(demo, classifier_path):
    """The fast path (several images per step through vmap, companions cropped on the device,
    bfloat16; the default on CUDA, forced here on the CPU) against the plain float32 path, image by
    image, on 16 demo images: M within 0.2 per pixel and 0.01 on average, seed mIoU within 0.3 points.
    bf16 alone makes the gap (device crops in fp32 stay within 1e-3): a few pixels of an image whose
    fine-tuning drifts apart in 3 steps, as it does with bf16 autocast on the plain path."""
    model, _, _ = load_classifier(classifier_path)
    pool = CompanionPool.from_manifest(demo.train, limit=40)
    records = demo.train.records[40:56]
    images = [load_image(demo.train.image_uri(r)) for r in records]
    keys = [demo.train.label_indices(r) for r in records]
    plain = RibConfig(iterations=3, precision="fp32", engine="plain", **SMALL)
    fast = plain.model_copy(update={"precision": "auto", "engine": "auto"})
    assert not fast.uses_bf16("cpu") and fast.uses_bf16("cuda:0") and fast.batched("cuda") and not fast.batched("cpu")
    runner = RibRunner(model, pool, plain)
    maps = {"plain": [runner.run(im, k, seed=j).map for j, (im, k) in enumerate(zip(images, keys, strict=True))],
            "fast": [o.map for o in runner.run_many(images, keys, fast.model_copy(update={"precision": "bf16"}),
                                                    seeds=list(range(len(images))))]}
    gaps = np.concatenate([np.abs(a.high_res - b.high_res).ravel()
                           for a, b in zip(maps["plain"], maps["fast"], strict=True)])
    tail = np.quantile(gaps, 0.999)
    print(f"\n|M fast - M plain|: max {gaps.max():.4f}, 99.9th percentile {tail:.4f}, mean {gaps.mean():.5f}")
    assert 0 < gaps.max() <= 0.2 and gaps.mean() <= 0.01
    gts = [load_mask(demo.train.mask_uri(r)) for r in records]
    miou = {p: sweep_seeds(zip(ms, gts, strict=True), len(demo.train.classes), EvalConfig())["best"]["miou"]
            for p, ms in maps.items()}
    print(f"seed mIoU on {len(records)} images: plain {100 * miou['plain']:.2f}, fast {100 * miou['fast']:.2f}")
    assert abs(miou["plain"] - miou["fast"]) <= 0.003


def test_run_many_equals_run_image_by_image(demo, classifier_path):
    """The batched path (stacked weights through torch.func.vmap) gives every image the map, the
    stop and the logit sums it gets alone, also when the images stop at different steps."""
    model, _, _ = load_classifier(classifier_path)
    pool = CompanionPool.from_manifest(demo.train, limit=40)
    records = demo.train.records[:3]
    images = [load_image(demo.train.image_uri(r)) for r in records]
    keys = [demo.train.label_indices(r) for r in records]
    free = RibConfig(iterations=3, lr=1e-4, margin=1e9, explode_ratio=1.0, **SMALL)
    runner = RibRunner(model, pool, free)
    pairs = list(zip(images, keys, strict=True))
    first = sorted(abs(runner.run(im, k, seed=j).target_logit_sums[0]) for j, (im, k) in enumerate(pairs))
    margin = (first[0] + first[1]) / 2  # two of the three images stop after step 1, one runs on
    for cfg in (free, free.model_copy(update={"margin": margin}),
                free.model_copy(update={"explode_ratio": 0.05, "map_iterates": "all_iterates", "pooling": "gap"})):
        alone = [runner.run(im, k, cfg, seed=j) for j, (im, k) in enumerate(pairs)]
        together = runner.run_many(images, keys, cfg, seeds=[0, 1, 2], device_crops=False)
        if cfg.margin == margin:
            assert len({(o.stop_reason, o.steps) for o in alone}) > 1  # by construction of the margin
        for a, b in zip(alone, together, strict=True):
            assert (a.stop_reason, a.steps) == (b.stop_reason, b.steps)
            np.testing.assert_allclose(a.target_logit_sums, b.target_logit_sums, rtol=1e-4)
            np.testing.assert_allclose(a.map.high_res, b.map.high_res, atol=1e-4)
            np.testing.assert_allclose(a.map.cam, b.map.cam, atol=1e-4)
    on_device = runner.run_many(images, keys, free, seeds=[0, 1, 2])  # companions cropped on the device
    for j, (im, k) in enumerate(pairs):  # the same draws, resized by torch, not PIL
        np.testing.assert_allclose(runner.run(im, k, free, seed=j).map.high_res, on_device[j].map.high_res, atol=5e-3)
    with pytest.raises(ValueError, match="one size"):
        runner.run_many([images[0], images[0][:40]], keys[:2])


def test_run_rib_over_a_manifest_batched_and_resumed(demo, classifier_path, tmp_path):
    """The dataset runner (`rib rib`, the demo job) gives the same maps through the batched engine
    as one image at a time, and a rerun only makes the maps that are missing."""
    model, _, _ = load_classifier(classifier_path)
    pool = CompanionPool.from_manifest(demo.train, limit=40)
    manifest = demo.val.subset([r.id for r in demo.val.records[:3]])
    plain = RibConfig(iterations=2, engine="plain", **SMALL)
    batched = plain.model_copy(update={"engine": "batched", "max_images_per_batch": 2})
    one_by_one = run_rib(model, manifest, pool, tmp_path / "plain", plain, progress=False)
    together = run_rib(model, manifest, pool, tmp_path / "batched", batched, progress=False)
    for r in manifest.records:
        a, b = (LocalizationMap.load(d / f"{r.id}.npz") for d in (one_by_one, together))
        np.testing.assert_allclose(a.high_res, b.high_res, atol=5e-3)  # device crops: torch's bicubic
    first = together / f"{manifest.records[0].id}.npz"
    kept = (together / f"{manifest.records[1].id}.npz").stat().st_mtime_ns
    first.unlink()
    run_rib(model, manifest, pool, together, batched, progress=False)
    assert first.exists() and (together / f"{manifest.records[1].id}.npz").stat().st_mtime_ns == kept


def test_the_cli_and_the_service_give_an_image_the_same_map(demo, classifier_path, tmp_path):
    """One seed rule (keyed on the image id): an image gets the same M through `rib rib` (run_rib
    over a manifest) and through a worker (PseudoMaskPipeline.process_many), whatever its position."""
    model, classes, _ = load_classifier(classifier_path)
    pool = CompanionPool.from_manifest(demo.train, limit=40)
    cfg = RibConfig(iterations=2, lr=1e-4, engine="plain", **SMALL)
    manifest = demo.val.subset([r.id for r in demo.val.records[:2]])
    cli = run_rib(model, manifest, pool, tmp_path / "cli", cfg, progress=False)
    worker = PseudoMaskPipeline(model, classes, pool, device="cpu", config=PipelineConfig(rib=cfg))
    records = manifest.records[::-1]  # another order than the manifest's
    images = [load_image(manifest.image_uri(r)) for r in records]
    results = worker.process_many(images, [list(r.labels) for r in records], cfg, [r.id for r in records])
    for r, result in zip(records, results, strict=True):
        expected = LocalizationMap.load(cli / f"{r.id}.npz")
        np.testing.assert_allclose(result.map.high_res, expected.high_res, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.map.cam, expected.cam, rtol=1e-5, atol=1e-6)
    # the draws matter: another seed gives the first image another map
    other = worker.process(images[0], list(records[0].labels), cfg.model_copy(update={"seed": 1}), records[0].id)
    assert not np.allclose(other.map.high_res, results[0].map.high_res, atol=1e-6)
