"""Dense CRF on localization maps: real demo images, real CAMs, real pydensecrf."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from rib_core.classifier.cam import CamConfig, LocalizationMap, assemble_map, compute_cam
from rib_core.config.stage_configs import CrfConfig
from rib_core.data.datasets import load_image, load_mask
from rib_core.data.demo_data import DemoDataset
from rib_core.data.evaluation import confusion, scores, seed_from_map
from rib_core.refine.crf import PSA_PROBABILITY_CRF, crf_mask, crf_seed
from rib_core.training.checkpoints import load_classifier


def coarse_map(gt: np.ndarray, keys: Sequence[int], stride: int = 16) -> LocalizationMap:
    """A CAM-like map from a ground-truth mask: each class's pixel fraction per stride-16 cell,
    upsampled the way CAMs are. Right place, blurred boundaries: what refinement has to fix."""
    onehot = torch.stack([torch.from_numpy((gt == k + 1).astype(np.float32)) for k in range(int(max(keys)) + 1)])
    cells = F.avg_pool2d(onehot[None], stride, ceil_mode=True)[0]
    return assemble_map([cells], gt.shape, keys)


def test_crf_snaps_a_shifted_seed_to_the_colour_edge() -> None:
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(40, 8, (64, 96, 3)), 0, 255).astype(np.uint8)
    image[:, 48:] = np.clip(rng.normal(200, 8, (64, 48, 3)), 0, 255).astype(np.uint8)
    truth = np.zeros((64, 96), np.uint8)
    truth[:, 48:] = 3  # class index 2 -> label 3
    shifted = np.zeros((1, 64, 96), np.float32)
    shifted[0, :, 40:] = 1.0  # the map spills 8 px over the edge, as CAMs do
    lmap = LocalizationMap(np.array([2]), shifted[:, ::4, ::4].copy(), shifted)
    seed = seed_from_map(lmap, 0.5)
    assert (seed != truth).sum() == 64 * 8
    for cfg in (CrfConfig(), PSA_PROBABILITY_CRF):
        refined = crf_seed(image, lmap, 0.5, cfg)
        assert refined.shape == truth.shape and refined.dtype == np.uint8
        assert set(np.unique(refined)) <= {0, 3}
        assert (refined != truth).sum() < (seed != truth).sum() / 4, cfg.unary
    # a finished mask (the walk's, with walk.crf) is snapped the same way, and the label seed's CRF is that
    snapped = crf_mask(image, seed, [2])
    assert (snapped != truth).sum() < (seed != truth).sum() / 4
    np.testing.assert_array_equal(snapped, crf_seed(image, lmap, 0.5))
    assert not crf_mask(image, seed, []).any()  # no class: all background


def test_crf_on_demo_refines_coarse_maps_along_edges(demo: DemoDataset) -> None:
    n_labels = len(demo.train.classes) + 1
    seed_conf = np.zeros((n_labels, n_labels), np.int64)
    crf_conf = np.zeros_like(seed_conf)
    changed_near_edge, changed = 0, 0
    for r in demo.train.records[:12]:
        image, gt = load_image(demo.train.image_uri(r)), load_mask(demo.train.mask_uri(r))
        lmap = coarse_map(gt, demo.train.label_indices(r))
        seed = seed_from_map(lmap, 0.3)
        refined = crf_seed(image, lmap, 0.3)
        assert refined.shape == gt.shape and refined.dtype == np.uint8
        assert set(np.unique(refined)) <= {0, *(np.asarray(lmap.keys) + 1)}
        seed_conf += confusion(seed, gt, n_labels)
        crf_conf += confusion(refined, gt, n_labels)
        diff = refined != seed
        g = gt.astype(float)
        edges = ndimage.binary_dilation(ndimage.sobel(g, 0) ** 2 + ndimage.sobel(g, 1) ** 2 > 0, iterations=10)
        changed += int(diff.sum())
        changed_near_edge += int((diff & edges).sum())
    assert changed > 0
    assert changed_near_edge / changed > 0.95  # the CRF works on boundaries, not inside regions
    assert scores(crf_conf)["miou"] > scores(seed_conf)["miou"] + 0.1


def test_crf_on_real_cams_keeps_shape_and_label_set(demo: DemoDataset, classifier_path: str) -> None:
    model, _, _ = load_classifier(classifier_path)
    model.eval()
    for r in demo.train.records[:4]:
        image = load_image(demo.train.image_uri(r))
        lmap = compute_cam(model, image, demo.train.label_indices(r), CamConfig(scales=(1.0,)))
        for cfg in (CrfConfig(), PSA_PROBABILITY_CRF):
            out = crf_seed(image, lmap, 0.15, cfg)
            assert out.shape == image.shape[:2] and out.dtype == np.uint8
            assert set(np.unique(out)) <= {0, *(np.asarray(lmap.keys) + 1)}


def test_crf_seed_edge_cases() -> None:
    image = np.full((20, 30, 3), 90, np.uint8)
    empty = LocalizationMap(np.zeros(0, np.int64), np.zeros((0, 5, 8), np.float32), np.zeros((0, 20, 30), np.float32))
    assert not crf_seed(image, empty, 0.2).any()
    full = LocalizationMap(np.array([7]), np.ones((1, 5, 8), np.float32), np.ones((1, 20, 30), np.float32))
    assert (crf_seed(image, full, 0.2) == 8).all()  # a uniform image keeps a uniform label
    with pytest.raises(ValueError, match="map is"):
        crf_seed(np.zeros((21, 30, 3), np.uint8), full, 0.2)
