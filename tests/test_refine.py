"""IRN refinement: path index, random walk, confident labels, saliency, training and the folder run.

Real parts throughout: demo images and CAMs from the session classifier, IRN trained for a few
iterations on CPU, checkpoints read back from a real moto S3 server.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rib_core.classifier.cam import LocalizationMap, run_cam
from rib_core.cli import main
from rib_core.config.stage_configs import ConfidentLabelConfig, IrnTrainConfig, RandomWalkConfig, RefineConfig
from rib_core.data.datasets import Manifest, load_image, load_mask
from rib_core.data.demo_data import DemoDataset
from rib_core.refine.confident_labels import confident_labels
from rib_core.refine.crf import crf_mask
from rib_core.refine.irn import IrnNet, PathIndex, boundary_map, load_irn, save_irn, search_offsets, segment
from rib_core.refine.irn_training import train_irn
from rib_core.refine.pseudo_masks import refine_maps, refine_one
from rib_core.refine.random_walk import propagate, random_walk, transition_matrix
from rib_core.refine.saliency import apply_saliency
from rib_core.training.checkpoints import CheckpointError, load_classifier
from tests.test_crf import coarse_map

N_IMAGES = 16


@pytest.fixture(scope="module")
def subset(demo: DemoDataset) -> Manifest:
    return demo.train.subset([r.id for r in demo.train.records[:N_IMAGES]])


@pytest.fixture(scope="module")
def cam_dir(subset: Manifest, classifier_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CAM maps of the first demo training images, as ``rib cam`` writes them."""
    model, _, _ = load_classifier(classifier_path)
    return run_cam(model, subset, tmp_path_factory.mktemp("cams"), progress=False)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A real moto S3 server in a subprocess."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def test_path_index_geometry() -> None:
    for radius, count in ((5, 34), (10, 152)):  # IRN's neighbourhoods for the walk and for training
        index = PathIndex(radius)
        offsets = [tuple(o) for o in index.offsets.tolist()]
        assert len(index) == count and len(set(offsets)) == count
        assert sorted(offsets) == sorted(search_offsets(radius))
        assert [len(p) for p in index.paths] == sorted(len(p) for p in index.paths)  # IRN's order
        for (dy, dx), path in zip(offsets, index.paths, strict=True):
            assert dy > 0 or (dy == 0 and dx > 0)
            assert dy * dy + dx * dx < radius * radius
            assert (0, 0) in path and (dy, dx) in path
            assert sorted(path) == sorted(segment(dy, dx))
            assert all((dy * x - dx * y) ** 2 < dy * dy + dx * dx for y, x in path)
    with pytest.raises(ValueError, match="too small"):
        PathIndex(10).source_shape((9, 30))


def dense_irn_walk(boundary: np.ndarray, x: np.ndarray, radius: int, beta: float, exp_times: int) -> np.ndarray:
    """IRN's dense formulation, from scratch: A over all pairs, column-normalised A^beta, squared
    ``exp_times`` times, x @ T."""
    h, w = boundary.shape
    n = h * w
    a = np.eye(n)
    for y in range(h):
        for xx in range(w):
            for dy, dx in search_offsets(radius):
                if 0 <= y + dy < h and 0 <= xx + dx < w:
                    aff = 1 - max(boundary[y + sy, xx + sx] for sy, sx in segment(dy, dx))
                    a[y * w + xx, (y + dy) * w + xx + dx] = a[(y + dy) * w + xx + dx, y * w + xx] = aff
    t = a ** beta
    t = t / t.sum(0, keepdims=True)
    for _ in range(exp_times):
        t = t @ t
    return (x.reshape(len(x), n) @ t).reshape(x.shape)


@pytest.mark.parametrize(("h", "w", "exp_times"), [(7, 9, 3), (10, 6, 8), (3, 4, 2)])
def test_sparse_random_walk_equals_irn_dense_walk(h: int, w: int, exp_times: int) -> None:
    rng = np.random.default_rng(h * w)
    boundary = rng.random((h, w)) ** 3
    x = rng.random((2, h, w))
    expected = dense_irn_walk(boundary, x, 5, 10.0, exp_times)
    got = propagate(torch.from_numpy(x).float(), transition_matrix(torch.from_numpy(boundary).float(), 5, 10.0),
                    2 ** exp_times)
    np.testing.assert_allclose(got.numpy(), expected, atol=2e-4)


def test_random_walk_stops_at_boundaries() -> None:
    h, w = 12, 16
    boundary = torch.zeros(h, w)
    boundary[:, 8] = 1.0  # a closed wall between the left and right halves
    cam = np.zeros((1, h, w), np.float32)
    cam[0, 3:9, 1:6] = 1.0  # the map covers part of the left half only
    lmap = LocalizationMap(np.array([3]), cam, np.zeros((1, 4 * h, 4 * w), np.float32))
    mask = random_walk(lmap, boundary, RandomWalkConfig())
    assert mask.shape == (4 * h, 4 * w) and mask.dtype == np.uint8
    assert (mask[:, :28] == 4).all()  # spread over the whole left half
    assert (mask[:, 40:] == 0).all()  # nothing crossed the wall
    empty = LocalizationMap(np.zeros(0, np.int64), np.zeros((0, h, w), np.float32), np.zeros((0, 4 * h, 4 * w)))
    assert not random_walk(empty, boundary).any()
    with pytest.raises(ValueError, match="boundary map"):
        random_walk(lmap, torch.zeros(h, w + 1))


def test_confident_labels_on_demo(demo: DemoDataset) -> None:
    labelled = correct = ignored = total = 0
    for r in demo.train.records[:8]:
        image, gt = load_image(demo.train.image_uri(r)), load_mask(demo.train.mask_uri(r))
        lmap = coarse_map(gt, demo.train.label_indices(r))
        labels = confident_labels(image, lmap, ConfidentLabelConfig())
        assert labels.shape == gt.shape and labels.dtype == np.uint8
        assert set(np.unique(labels)) <= {0, 255, *(np.asarray(lmap.keys) + 1)}
        known = labels != 255
        labelled += int(known.sum())
        correct += int((labels[known] == gt[known]).sum())
        ignored += int((~known).sum())
        total += labels.size
    assert 0 < ignored / total < 0.5  # an uncertain band between confident fg and bg
    assert correct / labelled > 0.9
    with pytest.raises(ValueError, match="below"):
        ConfidentLabelConfig(fg_threshold=0.1, bg_threshold=0.2)


def test_confident_labels_follow_the_seed_threshold() -> None:
    fixed = ConfidentLabelConfig()
    assert fixed.at_seed(0.45) == fixed  # the official behaviour: the thresholds as given
    low = ConfidentLabelConfig(follow_seed=True).at_seed(0.05)  # a third of RIB's 0.15
    assert low.fg_threshold == pytest.approx(0.35 / 3) and low.bg_threshold == pytest.approx(0.17 / 3)
    high = ConfidentLabelConfig(follow_seed=True).at_seed(0.60)  # above 0.15 the thresholds stay
    assert (high.fg_threshold, high.bg_threshold) == (0.35, 0.17)


def test_apply_saliency_ignores_disagreement() -> None:
    mask = np.array([[0, 3, 3, 255], [0, 0, 3, 0]], np.uint8)
    saliency = np.array([[0, 255, 0, 255], [255, 0, 200, 100]], np.uint8)
    expected = np.array([[0, 3, 255, 255], [255, 0, 3, 0]], np.uint8)
    np.testing.assert_array_equal(apply_saliency(mask, saliency, 0.5), expected)
    np.testing.assert_array_equal(apply_saliency(mask, saliency, 0.9)[1], [255, 0, 255, 0])
    with pytest.raises(ValueError, match="saliency map is"):
        apply_saliency(mask, saliency[:, :3])


def test_irn_network_shapes() -> None:
    torch.manual_seed(0)
    net = IrnNet("resnet50", crop_size=64).eval()
    edge, dp = net(torch.randn(1, 3, 64, 80))
    assert edge.shape == (1, 1, 16, 20) and dp.shape == (1, 2, 16, 20)
    assert not any(p.requires_grad for p in net.backbone.parameters())
    heads = net.param_groups()
    assert sum(p.numel() for p in heads[0]) > 0 and sum(p.numel() for p in heads[1]) > 0
    b = boundary_map(IrnNet("resnet18", crop_size=64), np.zeros((50, 70, 3), np.uint8))
    assert b.shape == (13, 18) and 0 <= b.min() and b.max() <= 1


def test_train_irn_refuses_bad_settings(subset: Manifest, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_irn(subset, tmp_path, tmp_path, IrnTrainConfig(arch="resnet18", batch_size=N_IMAGES + 1, crop_size=64,
                                                            radius=5))
    with pytest.raises(ValueError, match="too small for radius 10: use radius <= 8"):
        IrnTrainConfig(arch="resnet18", crop_size=64, radius=10)


def test_refine_refuses_a_random_irn_backbone(subset: Manifest, demo: DemoDataset, cam_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Neither irn.init_weights nor a classifier: refused before any work, in the library and the CLI."""
    cfg = RefineConfig(irn=IrnTrainConfig(arch="resnet18", crop_size=64, batch_size=8, epochs=1, radius=5))
    with pytest.raises(ValueError, match="IRN needs backbone weights"):
        refine_maps(cam_dir, subset, tmp_path / "lib", cfg, progress=False)
    assert not (tmp_path / "lib").exists()
    with pytest.raises(ValueError, match="IRN needs backbone weights"):
        train_irn(subset, tmp_path, tmp_path / "irn", cfg.irn, progress=False)
    manifest = demo.root / "train.jsonl"  # maps exist for the subset only
    assert main(["refine", str(cam_dir), str(manifest), str(tmp_path / "cli"), "--quiet"]) == 3
    assert "--classifier" in capsys.readouterr().err and not (tmp_path / "cli").exists()


def test_refine_trains_irn_on_the_classifier_backbone(subset: Manifest, cam_dir: Path, classifier_path: Path,
                                                     tmp_path: Path) -> None:
    eight = subset.subset([r.id for r in subset.records[:8]])
    cfg = RefineConfig(irn=IrnTrainConfig(arch="resnet18", crop_size=64, batch_size=8, epochs=1, radius=5))
    report = refine_maps(cam_dir, eight, tmp_path, cfg, progress=False, classifier=str(classifier_path))
    assert report["irn_backbone"] == str(classifier_path)
    model, extra = load_irn(tmp_path / "irn.pth")
    assert extra["backbone"] == str(classifier_path) and extra["steps"] == 1
    classifier, _, _ = load_classifier(classifier_path)
    expected = dict(classifier.backbone.named_parameters())
    for name, weight in model.backbone.named_parameters():
        assert torch.equal(weight, expected[name]), name


@pytest.mark.slow
def test_refine_maps_trains_irn_and_writes_masks(subset: Manifest, demo: DemoDataset, cam_dir: Path,
                                                 classifier_path: Path, tmp_path: Path) -> None:
    cfg = RefineConfig(irn=IrnTrainConfig(arch="resnet18", init_weights=str(classifier_path), crop_size=64,
                                          batch_size=8, epochs=2, radius=5))
    out = tmp_path / "out"
    report = refine_maps(cam_dir, demo.train, out, cfg, progress=False)  # maps exist for the subset only

    assert report["images"] == N_IMAGES and report["missing_maps"] == len(demo.train) - N_IMAGES
    assert report["evaluated_images"] == N_IMAGES
    for key in ("seeds_crf", "ir_labels", "masks"):
        assert 0 < report[key]["miou"] <= 1 and report[key]["images"] == N_IMAGES
    assert report["seeds"]["best_threshold"] == report["seed_threshold"]
    print(f"\nmIoU on {N_IMAGES} demo images: seed {report['seeds']['best']['miou']:.3f}, "
          f"seed+CRF {report['seeds_crf']['miou']:.3f}, IRN masks {report['masks']['miou']:.3f}")
    assert json.loads((out / "report.json").read_text())["masks"] == report["masks"]

    model, extra = load_irn(out / "irn.pth")
    assert extra["steps"] == (N_IMAGES // 8) * 2
    assert all(np.isfinite(h["loss"]) for h in extra["history"])
    classifier, _, _ = load_classifier(classifier_path)
    assert torch.equal(model.backbone.layer3[0].conv1.weight, classifier.backbone.layer3[0].conv1.weight)

    n_classes = len(demo.train.classes)
    for r in subset.records:
        with Image.open(out / "masks" / f"{r.id}.png") as im:
            assert im.mode == "P"
            mask = np.asarray(im)
        size = load_image(subset.image_uri(r)).shape[:2]
        assert mask.shape == size and set(np.unique(mask)) <= set(range(n_classes + 1))
        with Image.open(out / "overlays" / f"{r.id}.png") as im:
            assert im.mode == "RGB" and im.size == size[::-1]
        assert (out / "crf" / f"{r.id}.png").exists() and (out / "ir_labels" / f"{r.id}.png").exists()

    first = subset.records[0]
    image, lmap = load_image(subset.image_uri(first)), LocalizationMap.load(cam_dir / f"{first.id}.npz")
    one = refine_one(image, lmap, model, cfg.model_copy(update={"seed_threshold": report["seed_threshold"]}))
    assert set(one) == {"seed", "crf", "irn", "mask"}
    np.testing.assert_array_equal(one["irn"], np.asarray(Image.open(out / "masks" / f"{first.id}.png")))
    np.testing.assert_array_equal(one["crf"], np.asarray(Image.open(out / "crf" / f"{first.id}.png")))
    assert set(refine_one(image, lmap, None, cfg)) == {"seed", "crf", "mask"}
    # walk.crf: the walk's mask through the same dense CRF as seed + CRF, and that is the final mask
    walk_crf = cfg.model_copy(update={"seed_threshold": report["seed_threshold"],
                                      "walk": cfg.walk.model_copy(update={"crf": True})})
    snapped = refine_one(image, lmap, model, walk_crf)
    np.testing.assert_array_equal(snapped["irn"], crf_mask(image, one["irn"], lmap.keys, cfg.crf))
    np.testing.assert_array_equal(snapped["mask"], snapped["irn"])
    np.testing.assert_array_equal(snapped["crf"], one["crf"])

    # RIB-Sal with the trained checkpoint: saliency from the ground truth, no retraining.
    sal_dir = tmp_path / "saliency"
    sal_dir.mkdir()
    for r in subset.records:
        gt = load_mask(subset.mask_uri(r))
        Image.fromarray(np.where((gt > 0) & (gt != 255), 255, 0).astype(np.uint8)).save(sal_dir / f"{r.id}.png")
    out2 = tmp_path / "sal"
    sal = refine_maps(cam_dir, subset, out2, cfg, irn_checkpoint=str(out / "irn.pth"), saliency_dir=str(sal_dir),
                      progress=False)
    assert not (out2 / "ir_labels").exists() and not (out2 / "irn.pth").exists()
    assert sal["masks_without_saliency"]["miou"] == pytest.approx(report["masks"]["miou"])
    assert sal["masks"]["ignored_fraction"] > 0
    assert sal["masks"]["miou"] >= sal["masks_without_saliency"]["miou"]
    for r in subset.records:
        raw = np.asarray(Image.open(out / "masks" / f"{r.id}.png"))
        gt_fg = np.asarray(Image.open(sal_dir / f"{r.id}.png")) > 0
        expected = np.where(((raw > 0) & ~gt_fg) | ((raw == 0) & gt_fg), 255, raw)
        np.testing.assert_array_equal(np.asarray(Image.open(out2 / "masks" / f"{r.id}.png")), expected)


def test_refine_maps_without_irn_and_with_missing_inputs(subset: Manifest, cam_dir: Path, tmp_path: Path) -> None:
    report = refine_maps(cam_dir, subset, tmp_path / "crf_only", RefineConfig(use_irn=False), progress=False)
    assert "irn_checkpoint" not in report and report["masks"]["miou"] == pytest.approx(report["seeds_crf"]["miou"])
    with pytest.raises(FileNotFoundError, match="no map"):
        refine_maps(tmp_path / "nothing", subset, tmp_path / "x", progress=False)
    with pytest.raises(FileNotFoundError, match="saliency"):
        refine_maps(cam_dir, subset, tmp_path / "y", saliency_dir=str(tmp_path / "nosal"), progress=False)


def test_irn_checkpoint_from_s3_and_bad_files(s3_endpoint: str, classifier_path: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    for k, v in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    torch.manual_seed(1)
    model = IrnNet("resnet18", crop_size=64)
    model.dp_mean.fill_(0.25)
    path = tmp_path / "irn.pth"
    save_irn(model, path, extra={"note": "test"})
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="weights")
    client.put_object(Bucket="weights", Key="irn/irn.pth", Body=path.read_bytes())
    loaded, extra = load_irn("s3://weights/irn/irn.pth")
    assert extra == {"note": "test"} and loaded.crop_size == 64 and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    with pytest.raises(CheckpointError, match="not found"):
        load_irn("s3://weights/irn/missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_irn(garbage)
    with pytest.raises(CheckpointError, match="not a rib-irn"):
        load_irn(classifier_path)
