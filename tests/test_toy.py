"""The toy experiment of paper section 3.1: data, HGR, gradient maps, trends and a small full run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from rib_core.experiments.toy import ToyNet, find_trends, gradient_maps, hgr, normalise_gradients, run_toy_experiment
from rib_core.experiments.toy_data import BG, ND, REGIONS, D, ToyConfig, make_toy_data

torch.set_num_threads(2)

SMALL = ToyConfig(channels=(8, 16, 16, 32, 32), epochs=10, batch_size=32, n_analysis=12, rib_iterations=3,
                  rib_batch=4)


def test_hgr_on_a_hand_made_gradient_map() -> None:
    regions = torch.tensor([[[0, 0, 1, 1],
                             [0, 0, 1, 1],
                             [2, 2, 2, 2],
                             [2, 2, 2, 2]]])
    raw = torch.tensor([[[[-10.0, 5.0, 2.0, 0.0],
                          [1.0, -4.0, 3.5, 3.0],
                          [0.0, 0.0, 0.0, 0.0],
                          [0.0, 0.0, -3.1, 0.0]]]])
    maps = normalise_gradients(raw)
    assert maps.max() == 1.0 and maps.min() == 0.0
    # |G| / 10: R_D has 1.0, 0.5, 0.1, 0.4 -> 3 of 4 above 0.3; R_ND 0.2, 0, 0.35, 0.3 -> 1 of 4
    # (0.3 is not above 0.3); R_BG one 0.31 among 8 pixels.
    out = hgr(maps, regions, 0.3)
    assert set(out) == set(REGIONS)
    assert out["R_D"] == pytest.approx([0.75])
    assert out["R_ND"] == pytest.approx([0.25])
    assert out["R_BG"] == pytest.approx([0.125])
    # Averaging is per image, then over images: a second image with everything high gives 1.0 each.
    both = hgr(torch.cat([maps, torch.ones_like(maps)]), torch.cat([regions, regions]), 0.3)
    assert both["R_D"] == pytest.approx([0.875]) and both["R_BG"] == pytest.approx([0.5625])


def test_all_zero_gradient_stays_zero_and_missing_region_is_an_error() -> None:
    maps = normalise_gradients(torch.zeros(1, 1, 3, 3))
    assert torch.equal(maps, torch.zeros(1, 1, 3, 3))
    with pytest.raises(ValueError, match="R_ND"):
        hgr(maps, torch.zeros(1, 3, 3, dtype=torch.long), 0.3)


def test_gradient_maps_are_per_image_and_match_autograd() -> None:
    torch.manual_seed(0)
    model = ToyNet((4, 4, 4, 4, 4), (1, 2, 1, 2, 1))
    x = torch.rand(3, 1, 40, 40)
    y = torch.tensor([0, 1, 1])
    batch = gradient_maps(model, x, y)
    assert batch.shape == (3, 6, 40, 40)
    single = torch.cat([gradient_maps(model, x[i:i + 1], y[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single)
    torch.testing.assert_close(gradient_maps(model, x, y, final_only=True)[:, 0], batch[:, 5])
    # G_6 of the second image, by hand: d y^1 / dx, |.| / max.
    xi = x[1:2].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xi)[0, 1], xi)
    torch.testing.assert_close(batch[1, 5], (grad.abs() / grad.abs().max())[0, 0])


def test_toy_data_regions_shapes_and_split() -> None:
    cfg = ToyConfig(n_analysis=20)
    train, test, analysis = make_toy_data(cfg)
    assert len(train.labels) == 800 and len(test.labels) == 200 and len(analysis.labels) == 20
    assert train.shaped.sum() == 80 and test.shaped.sum() == 20 and analysis.shaped.all()
    for data in (train, test, analysis):
        has_nd = (data.regions == ND).any(axis=(1, 2))
        assert np.array_equal(has_nd, data.shaped)
        # Shapes are drawn at full intensity and never touch the digit's ink.
        assert (data.images[data.regions == ND] == 1.0).all()
        assert (data.images[data.regions == BG] == 0.0).all()
    # A circle for '2' (class 0), a square for '8' (class 1): the square fills its bounding box.
    for i in range(len(analysis.labels)):
        rows, cols = np.nonzero(analysis.regions[i] == ND)
        ink_rows, ink_cols = np.nonzero(analysis.regions[i] == D)
        apart = cfg.shape_gap + 1
        assert (rows.min() >= ink_rows.max() + apart or rows.max() + apart <= ink_rows.min()
                or cols.min() >= ink_cols.max() + apart or cols.max() + apart <= ink_cols.min())
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        filled = len(rows) / box
        assert filled == 1.0 if analysis.labels[i] == 1 else filled < 0.9
    assert set(np.unique(train.labels)) == {0, 1}


def test_config_rejects_a_canvas_too_small() -> None:
    with pytest.raises(ValueError, match="canvas"):
        ToyConfig(canvas=40, shape_size=12)


def test_trends_follow_the_numbers() -> None:
    cfg = ToyConfig()
    paper_like = {"R_D": np.array([1.0, 1.0, 0.95, 0.9, 0.6, 0.35]),
                  "R_ND": np.array([1.0, 1.0, 0.95, 0.9, 0.75, 0.1]),
                  "R_BG": np.array([1.0, 0.1, 0.05, 0.05, 0.05, 0.05])}
    rising = {"R_D": np.linspace(0.35, 0.8, 10), "R_ND": np.linspace(0.1, 0.6, 10), "R_BG": np.full(10, 0.05)}
    trends = find_trends(paper_like, rising, cfg)
    assert all(t["holds"] for t in trends.values())
    flat_nd = {**paper_like, "R_ND": np.array([1.0, 0.5, 0.4, 0.3, 0.3, 0.3])}
    falling = {**rising, "R_D": rising["R_D"][::-1]}
    trends = find_trends(flat_nd, falling, cfg)
    assert not trends["nd_drops_most_at_final_layer"]["holds"]
    assert not trends["nd_compressed_more_than_d_at_final_layer"]["holds"]
    assert not trends["d_rises_over_rib"]["holds"] and trends["nd_rises_over_rib"]["holds"]
    assert not trends["rib_trend"]["holds"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("toy")
    return out, run_toy_experiment(out, SMALL)


@pytest.mark.slow
def test_small_run_writes_figures_and_results(small_run: tuple[Path, dict[str, Any]]) -> None:
    out, results = small_run
    for name in ("fig1c_hgr_per_layer.png", "fig2b_hgr_over_rib.png", "fig1b_gradient_examples.png",
                 "fig2a_rib_examples.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and min(im.size) > 100
    assert json.loads((out / "toy_results.json").read_text()) == json.loads(json.dumps(results))


@pytest.mark.slow
def test_small_run_numbers_are_sane(small_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = small_run
    assert results["classifier"]["test_accuracy"] > 0.8
    assert results["data"]["analysis"] == SMALL.n_analysis
    per_layer, over_rib = results["hgr_per_layer"], results["hgr_over_rib"]
    assert per_layer["layers"] == ["G1", "G2", "G3", "G4", "G5", "G6"]
    assert over_rib["iterations"] == list(range(SMALL.rib_iterations))
    for curves, length in ((per_layer, 6), (over_rib, SMALL.rib_iterations)):
        for region in REGIONS:
            assert len(curves[region]) == length
            assert all(0.0 <= v <= 1.0 for v in curves[region])
    # Before any RIB step the model is the trained one: k = 0 is the per-layer G6.
    assert [over_rib[r][0] for r in REGIONS] == pytest.approx([per_layer[r][-1] for r in REGIONS])
    trends = results["trends"]
    assert all(isinstance(t["holds"], bool) and t["statement"] for t in trends.values())
    assert trends["rib_trend"]["holds"] == all(
        trends[k]["holds"] for k in ("d_rises_over_rib", "nd_rises_over_rib", "bg_flat_over_rib"))
    assert trends["bg_flat_over_rib"]["holds"] == (
        abs(over_rib["R_BG"][-1] - over_rib["R_BG"][0]) <= SMALL.flat_tolerance)
