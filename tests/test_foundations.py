"""Networks, checkpoints (ours and IRN's layout), manifests, importers, evaluation, and the
baseline chain (train classifier -> CAM -> threshold sweep) on real demo images."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import models

from rib_core.classifier.cam import CamConfig, LocalizationMap, run_cam
from rib_core.classifier.train import ClassifierTrainConfig, train_classifier
from rib_core.data.classes import VOC_CLASSES
from rib_core.data.datasets import ManifestError, load_image, load_manifest, load_mask, parse_manifest
from rib_core.data.evaluation import all_background_miou, confusion, scores, seed_from_map, sweep_seeds
from rib_core.data.importers import import_coco, import_voc
from rib_core.rib.companions import CompanionPool, DeviceCompanions
from rib_core.training.augment import apply_crop, draw_crop
from rib_core.training.checkpoints import CheckpointError, load_classifier, save_classifier
from rib_core.training.networks import CamNet, FixedBatchNorm


def test_cam_network_follows_irn_layout():
    net = CamNet(5, "resnet18")
    x = torch.randn(2, 3, 96, 64)
    cam = net.cam(x)
    assert cam.shape == (2, 5, 6, 4)  # output stride 16
    assert torch.allclose(net.logits(x), cam.mean(dim=(2, 3)), atol=1e-5)
    assert not any(p.requires_grad for p in [*net.backbone.conv1.parameters(), *net.backbone.bn1.parameters()])
    assert net.classifier.bias is None
    bn = net.backbone.layer3[0].bn1
    assert isinstance(bn, FixedBatchNorm) and bn.weight.requires_grad
    before = bn.running_mean.clone()
    net.train()
    net.logits(x).sum().backward()
    assert torch.equal(bn.running_mean, before)  # statistics never move
    assert net.backbone.layer2[0].conv1.weight.grad is None  # stage 2 output is detached
    assert net.backbone.layer3[0].conv1.weight.grad is not None


class _IrnLayoutNet(nn.Module):
    """The module structure of IRN's net/resnet50_cam.Net, so that its state dict has the official
    keys (resnet50.*, the stage*/backbone.*/newly_added.* aliases and classifier.weight)."""

    def __init__(self, n_cls: int) -> None:
        super().__init__()
        self.resnet50 = models.resnet50(weights=None)
        del self.resnet50.fc, self.resnet50.avgpool
        r = self.resnet50
        self.stage1 = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1)
        self.stage2, self.stage3, self.stage4 = (nn.Sequential(r.layer2), nn.Sequential(r.layer3),
                                                 nn.Sequential(r.layer4))
        self.classifier = nn.Conv2d(2048, n_cls, 1, bias=False)
        self.backbone = nn.ModuleList([self.stage1, self.stage2, self.stage3, self.stage4])
        self.newly_added = nn.ModuleList([self.classifier])


def test_official_checkpoint_loads_as_is(tmp_path):
    torch.manual_seed(0)
    official = _IrnLayoutNet(20)
    for m in official.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = official.state_dict()
    assert "stage4.0.0.conv1.weight" in state and "backbone.0.0.weight" in state and "newly_added.0.weight" in state
    path = tmp_path / "res50_cam.pth"
    torch.save(state, path)
    model, classes, extra = load_classifier(path)
    assert classes == list(VOC_CLASSES) and extra["source"] == "irn-official" and model.arch == "resnet50"
    x = torch.randn(1, 3, 64, 64)
    # The same weights through IRN's forward (layer4 at stride 1, stored BN statistics).
    official.resnet50.layer4[0].conv2.stride = (1, 1)
    official.resnet50.layer4[0].downsample[0].stride = (1, 1)
    official.eval()
    with torch.no_grad():
        feats = official.stage4(official.stage3(official.stage2(official.stage1(x))))
        expected = nn.functional.conv2d(feats, official.classifier.weight)
        assert torch.allclose(model.eval().cam(x), expected, atol=1e-4)
    # DataParallel's "module." prefix is accepted too
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "dp.pth")
    assert load_classifier(tmp_path / "dp.pth")[0].arch == "resnet50"


def test_bad_checkpoints_say_what_is_wrong(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_classifier(tmp_path / "garbage.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_classifier(tmp_path / "absent.pth")
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="neither a rib-cam checkpoint nor an IRN"):
        load_classifier(tmp_path / "other.pth")
    net = CamNet(3, "resnet18")
    save_classifier(net, ["a", "b", "c"], tmp_path / "ours.pth")
    truncated = (tmp_path / "ours.pth").read_bytes()[:5000]
    (tmp_path / "truncated.pth").write_bytes(truncated)
    with pytest.raises(CheckpointError, match="not a readable"):
        load_classifier(tmp_path / "truncated.pth")
    payload = torch.load(tmp_path / "ours.pth", weights_only=True)
    payload["state_dict"]["classifier.weight"] = torch.zeros(4, 512, 1, 1)
    torch.save(payload, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"classifier\.weight has shape"):
        load_classifier(tmp_path / "shape.pth")
    payload["version"] = 99
    torch.save(payload, tmp_path / "future.pth")
    with pytest.raises(CheckpointError, match="format version 99"):
        load_classifier(tmp_path / "future.pth")
    model, classes, _ = load_classifier(tmp_path / "ours.pth")
    assert classes == ["a", "b", "c"] and model.arch == "resnet18"


def test_manifest_validation_reports_every_bad_line(demo, tmp_path):
    header = json.dumps({"format": "rib-manifest", "version": 1, "classes": ["cat", "dog"]})
    good = json.dumps({"id": "a", "image": "a.png", "labels": ["cat"]})
    lines = [header, good, "{not json", json.dumps({"id": "a", "image": "b.png", "labels": ["dog"]}),
             json.dumps({"id": "c", "image": "c.png", "labels": ["horse"]}),
             json.dumps({"id": "d", "image": "d.png", "labels": []}), json.dumps({"id": "e", "labels": ["cat"]})]
    with pytest.raises(ManifestError) as err:
        parse_manifest("\n".join(lines))
    messages = dict(err.value.errors)
    assert "not valid JSON" in messages[3]
    assert "duplicate id 'a'" in messages[4]
    assert "unknown class(es) ['horse']" in messages[5]
    assert "empty label set" in messages[6]
    assert "missing field(s) image" in messages[7]
    with pytest.raises(ManifestError, match="no class list"):
        parse_manifest(good)
    (tmp_path / "m.jsonl").write_text(header + "\n" + good + "\n")
    with pytest.raises(ManifestError, match="image of 'a' not found"):
        load_manifest(tmp_path / "m.jsonl")
    assert len(load_manifest(Path(demo.root) / "val.jsonl")) == len(demo.val)


def test_voc_and_coco_importers(demo, tmp_path):
    voc = tmp_path / "VOC2012"
    for d in ("JPEGImages", "Annotations", "SegmentationClass"):
        (voc / d).mkdir(parents=True)
    ids = ["2007_000032", "2007_000033"]
    for image_id, names in zip(ids, [["aeroplane", "person"], ["dog"]], strict=True):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(voc / "JPEGImages" / f"{image_id}.jpg")
        objs = "".join(f"<object><name>{n}</name></object>" for n in names)
        (voc / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{objs}</annotation>")
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(voc / "SegmentationClass" / "2007_000032.png")
    (tmp_path / "train.txt").write_text("\n".join(ids) + "\n")
    m = import_voc(voc, tmp_path / "train.txt", tmp_path / "out" / "voc.jsonl")
    loaded = load_manifest(tmp_path / "out" / "voc.jsonl")
    assert [r.labels for r in loaded.records] == [("aeroplane", "person"), ("dog",)]
    assert loaded.records[0].mask and loaded.records[1].mask is None and len(m) == 2

    from rib_core.data.classes import COCO_CLASSES
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(COCO_CLASSES)]
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "COCO_1.jpg")
    square = [[2, 2, 12, 2, 12, 12, 2, 12]]
    dog = COCO_CLASSES.index("dog") + 1
    anns = [{"image_id": 1, "category_id": dog, "area": 50, "iscrowd": 0, "segmentation": square}]
    (tmp_path / "inst.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "COCO_1.jpg", "height": 20, "width": 30},
                   {"id": 2, "file_name": "COCO_2.jpg", "height": 20, "width": 30}],
        "annotations": anns, "categories": cats}))
    coco = import_coco(tmp_path, tmp_path / "inst.json", tmp_path / "coco.jsonl", masks_dir=tmp_path / "cm")
    assert [r.labels for r in coco.records] == [("dog",)]  # image 2 has no annotation: left out
    mask = load_mask(str(tmp_path / "cm" / "COCO_1.png"))
    assert mask[5, 5] == COCO_CLASSES.index("dog") + 1 and mask[15, 20] == 0


def test_evaluation_matches_hand_counts():
    gt = np.array([[0, 1, 1, 255], [0, 2, 2, 2]], np.uint8)
    pred = np.array([[0, 1, 0, 1], [1, 2, 2, 0]], np.uint8)
    conf = confusion(pred, gt, 3)
    assert conf.sum() == 7  # the 255 pixel is ignored
    s = scores(conf)
    assert s["iou"]["background"] == pytest.approx(1 / 4)
    assert s["iou"]["1"] == pytest.approx(1 / 3)
    assert s["iou"]["2"] == pytest.approx(2 / 3)
    assert s["precision"] == pytest.approx((1 / 2 + 1) / 2) and s["recall"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    lmap = LocalizationMap(np.array([0, 2]), np.zeros((2, 1, 1), np.float32),
                           np.array([[[0.3, 0.9]], [[0.5, 0.2]]], np.float32))
    assert seed_from_map(lmap, 0.3).tolist() == [[3, 1]]
    assert seed_from_map(lmap, 0.5).tolist() == [[0, 1]]  # a tie goes to background


@pytest.mark.slow
def test_baseline_chain_beats_all_background(demo, classifier_path, tmp_path):
    model, classes, extra = load_classifier(classifier_path)
    losses = [h["loss"] for h in extra["history"]]
    assert losses[-1] < losses[0]
    maps = run_cam(model, demo.val, tmp_path / "cam", CamConfig(), progress=False)
    gts = {r.id: load_mask(demo.val.mask_uri(r)) for r in demo.val.records}
    report = sweep_seeds(((LocalizationMap.load(maps / f"{i}.npz"), g) for i, g in gts.items()), len(classes))
    floor = all_background_miou(gts.values(), len(classes))
    assert report["best"]["miou"] > floor + 0.03, (report["best"]["miou"], floor)
    m = LocalizationMap.load(maps / f"{demo.val.records[0].id}.npz")
    assert m.high_res.shape[1:] == (64, 64) and m.cam.shape[1:] == (16, 16)
    peaks = m.high_res.reshape(len(m.keys), -1).max(1)
    # normalised per class: peak 1, or 0 where the classifier's (ReLU'd) CAM is zero everywhere
    assert np.all((np.abs(peaks - 1) < 1e-3) | (peaks == 0)), peaks


@pytest.mark.heavy  # trains a network
def test_classifier_training_resumes_the_same_run(demo, tmp_path):
    cfg = ClassifierTrainConfig(arch="resnet18", batch_size=8, epochs=2, lr=0.05, crop_size=48,
                                resize_long=(40, 56), from_scratch=True)
    small = demo.train.subset([r.id for r in demo.train.records[:16]])
    straight = train_classifier(small, tmp_path / "straight", cfg, progress=False)
    interrupted = train_classifier(small, tmp_path / "resumed", cfg, progress=False, stop_after_epoch=1)
    assert interrupted.name == "train_state.pth" and not (tmp_path / "resumed" / "classifier.pth").exists()
    resumed = train_classifier(small, tmp_path / "resumed", cfg, progress=False)
    a, b = load_classifier(straight)[0].state_dict(), load_classifier(resumed)[0].state_dict()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k


def test_device_crops_make_the_host_crops(demo):
    """The batched device crops (one grid_sample over a step's companions, uploaded as one batch)
    follow the same draws as IRN's PIL path: equal without a resize, close with one (torch's bicubic
    is not PIL's and does not antialias; docs/FIDELITY.md), zero in the same padding."""
    images = [load_image(demo.train.image_uri(r)) for r in demo.train.records[:6]]
    images = [im[: 40 + 5 * j, : 64 - 4 * j] for j, im in enumerate(images)]  # sizes differ
    pool = CompanionPool(images, np.eye(6, 5, dtype=bool), [str(j) for j in range(6)], [f"c{c}" for c in range(5)])
    on_device = DeviceCompanions(pool, torch.device("cpu"))
    rng = random.Random(0)
    for resize_long in (None, (32, 96)):
        chosen = [[0, 1, 2], [3, 4, 5]]
        draws = [[draw_crop(images[i].shape[:2], 56, resize_long, True, rng) for i in row] for row in chosen]
        crops, labels = on_device.crops(chosen, draws)
        host = torch.stack([torch.stack([apply_crop(images[i], d) for i, d in zip(row, ds, strict=True)])
                            for row, ds in zip(chosen, draws, strict=True)])
        assert crops.shape == host.shape == (2, 3, 3, 56, 56)
        assert torch.equal(labels, torch.from_numpy(pool.labels[chosen].astype(np.float32)))
        assert torch.equal(crops == 0, host == 0)
        gap = (crops - host).abs()
        if resize_long is None:
            assert gap.max() < 1e-4
        else:
            assert any(d.flip for row in draws for d in row)
            assert gap.mean() < 0.05 and gap.max() < 1.0, (gap.mean(), gap.max())  # measured 0.018, 0.37
