"""DeepLab on pseudo-masks: networks, training, resume, DDP, re-training, evaluation and jobs.

All on the real demo dataset with a ResNet-18 backbone and tiny crops on the CPU. DDP runs as a real
``torchrun`` of the ``rib`` CLI with two gloo processes; S3 is moto's real server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rib_core.config.network_configs import DeepLabTrainConfig
from rib_core.config.stage_configs import RandomWalkConfig
from rib_core.data.classes import IGNORE_INDEX
from rib_core.data.datasets import Manifest, ManifestRecord, load_mask
from rib_core.data.demo_data import DemoDataset
from rib_core.data.evaluation import all_background_miou
from rib_core.deeplab.job import (
    fill_ignored,
    run_training_job,
    segmentation_loss,
    train_deeplab,
    train_with_retraining,
)
from rib_core.deeplab.model import DeepLab, load_deeplab, load_initial_weights, save_deeplab
from rib_core.io.visualize import label_png
from rib_core.refine.random_walk import three_way_labels
from rib_core.training.checkpoints import CheckpointError
from rib_core.training.networks import BACKBONES
from tests.service_stack import moto_s3

# Tiny runs: ResNet-18, 64 px crops (the demo images' size), no MSC unless a test needs it.
TINY: dict[str, Any] = {"arch": "resnet18", "batch_size": 4, "crop_size": 64, "scales": [0.75, 1.0, 1.25],
                        "msc_scales": [], "retrain": False, "log_every": 5, "checkpoint_every": 1000}


def _subset(manifest: Manifest, n: int) -> Manifest:
    """The first ``n`` records with absolute paths, so the manifest can be saved anywhere."""
    return Manifest(manifest.classes, [replace(r, image=manifest.image_uri(r), mask=manifest.mask_uri(r))
                                       for r in manifest.records[:n]])


def _same_weights(a: nn.Module | dict[str, torch.Tensor], b: nn.Module | dict[str, torch.Tensor]) -> bool:
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_networks_stride_msc_and_param_groups() -> None:
    torch.manual_seed(0)
    v2 = DeepLab(6, "deeplabv2", "resnet18")
    x = torch.randn(2, 3, 64, 64)
    full, half, three_q, fused = v2.eval()(x)
    assert full.shape == fused.shape == (2, 6, 8, 8)  # output stride 8
    assert half.shape[-2:] == (4, 4) and three_q.shape[-2:] == (6, 6)
    assert torch.all(fused >= full - 1e-6)  # pixel-wise max over the scales
    assert [b.dilation for b in v2.head.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    groups = v2.param_groups(lr=1e-3, weight_decay=5e-4, head_lr_mult=10)
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-2, 2e-2])
    assert [g["weight_decay"] for g in groups] == [5e-4, 5e-4, 0.0]
    assert len(groups[1]["params"]) == len(groups[2]["params"]) == 4  # ASPP weights / biases
    # Frozen BN: not optimised, and in eval mode even while the network trains.
    assert all(not p.requires_grad for m in v2.backbone.modules() if isinstance(m, nn.BatchNorm2d)
               for p in m.parameters())
    v2.train()
    assert v2.head.training and not v2.backbone.bn1.training
    unfrozen = DeepLab(6, "deeplabv2", "resnet18", msc_scales=[], freeze_bn=False).train()
    assert unfrozen.backbone.bn1.training and len(unfrozen(x)) == 1
    # torchvision's DeepLabV3 on ResNet-101, built without any weights; its logits come at full size.
    v3 = DeepLab(21, "deeplabv3", "resnet101", msc_scales=[])
    assert type(v3.net).__name__ == "DeepLabV3" and len(v3.backbone.layer3) == 23
    assert v3.eval()(torch.randn(1, 3, 33, 33))[0].shape == (1, 21, 33, 33)


def test_config_presets_and_checks() -> None:
    voc, coco = DeepLabTrainConfig(), DeepLabTrainConfig(preset="coco")
    assert (voc.batch_size, voc.iterations, voc.lr, voc.crop_size, voc.retrain) == (10, 30_000, 2.0e-4, 321, True)
    assert (coco.batch_size, coco.iterations, coco.lr, coco.crop_size, coco.retrain) == (
        10, 100_000, 2.5e-4, 481, False)
    assert (voc.momentum, voc.weight_decay, voc.poly_power, voc.atrous_rates) == (0.9, 5e-4, 0.9, [6, 12, 18, 24])
    assert DeepLabTrainConfig(preset="coco", crop_size=400).crop_size == 400  # explicit values win
    with pytest.raises(ValueError, match="preset"):
        DeepLabTrainConfig(preset="ade")
    with pytest.raises(ValueError, match="below"):  # the re-training labels' thresholds live with the walk
        RandomWalkConfig(retrain_fg_threshold=0.2, retrain_bg_threshold=0.3)
    with pytest.raises(ValueError):
        DeepLabTrainConfig(learning_rate=0.1)


def test_loss_ignores_255_and_never_nan() -> None:
    logits = torch.randn(1, 3, 4, 4)
    labels = torch.full((1, 8, 8), IGNORE_INDEX, dtype=torch.long)
    assert segmentation_loss([logits], labels).item() == 0.0
    labels[0, :4] = 1  # the top half is class 1: labels are resized by nearest to the logits
    expected = nn.functional.cross_entropy(logits[:, :, :2], torch.ones(1, 2, 4, dtype=torch.long))
    assert segmentation_loss([logits], labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_initial_weights_kinds_and_refusals(classifier_path: Path, tmp_path: Path) -> None:
    model = DeepLab(6, "deeplabv2", "resnet18", msc_scales=[])
    torch.manual_seed(3)
    resnet = BACKBONES["resnet18"]()
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    assert load_initial_weights(model, tmp_path / "resnet18.pth") == "resnet"
    assert torch.equal(model.backbone.layer4[1].conv2.weight, resnet.layer4[1].conv2.weight)
    assert load_initial_weights(model, classifier_path) == "classifier"
    save_deeplab(model, [f"c{i}" for i in range(5)], tmp_path / "dl.pth")
    other = DeepLab(6, "deeplabv2", "resnet18", msc_scales=[])
    assert load_initial_weights(other, tmp_path / "dl.pth") == "deeplab" and _same_weights(model, other)
    with pytest.raises(CheckpointError, match="resnet18 with 6"):
        load_initial_weights(DeepLab(3, "deeplabv2", "resnet18"), tmp_path / "dl.pth")
    with pytest.raises(CheckpointError, match="not a torchvision resnet50"):
        load_initial_weights(DeepLab(6, "deeplabv2", "resnet50"), tmp_path / "resnet18.pth")
    with pytest.raises(CheckpointError, match="resnet18 backbone"):
        load_initial_weights(DeepLab(6, "deeplabv2", "resnet34"), classifier_path)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_initial_weights(model, tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_initial_weights(model, tmp_path / "absent.pth")


def test_three_way_labels_and_fill() -> None:
    scores = np.zeros((2, 2, 4), np.float32)
    scores[0] = [[0.9, 0.25, 0.1, 0.0], [0.31, 0.0, 0.0, 0.19]]
    scores[1] = [[0.1, 0.1, 0.5, 0.0], [0.0, 0.29, 0.0, 0.0]]
    labels = three_way_labels(scores, keys=[3, 0])  # channel 0 is class 3 (label 4), channel 1 class 0 (label 1)
    assert labels.tolist() == [[4, 255, 1, 0], [4, 255, 0, 0]]
    with pytest.raises(ValueError, match="len\\(keys\\)"):
        three_way_labels(scores, keys=[1])
    assert three_way_labels(np.ones((0, 2, 2)), keys=[]).tolist() == [[0, 0], [0, 0]]
    prediction = np.full((2, 4), 2, np.uint8)
    assert fill_ignored(labels, prediction).tolist() == [[4, 2, 1, 0], [4, 2, 0, 0]]


@pytest.mark.slow
def test_train_evaluate_predict_jobs_on_demo(demo: DemoDataset, tmp_path: Path) -> None:
    """Train on the demo's ground-truth masks (the machinery, not the pseudo-masks' quality: the
    docs/USAGE.md's command trains on those), evaluate on val, predict PNG masks: one job, then the
    evaluate and predict jobs on their own. From scratch with batch norm trained."""
    torch.set_num_threads(2)
    cfg = {**TINY, "iterations": 200, "lr": 2e-3, "freeze_bn": False}
    trained = run_training_job({"kind": "train", "manifest": str(demo.root / "train.jsonl"),
                                "output": str(tmp_path / "train"), "config": cfg,
                                "evaluate_on": str(demo.root / "val.jsonl")})
    print("deeplab demo loss", [round(h["loss"], 3) for h in trained["history"]])
    assert trained["steps"] == 200 and trained["rounds"] == 1
    assert trained["loss_last"] < 0.6 * trained["loss_first"]
    assert json.loads((tmp_path / "train" / "train_report.json").read_text())["loss_last"] == trained["loss_last"]
    report = run_training_job({"kind": "evaluate", "manifest": str(demo.root / "val.jsonl"), "config": cfg,
                               "output": str(tmp_path / "eval"), "checkpoint": trained["checkpoint"]})
    # The train job's own evaluation (evaluate_on) is the same as a separate evaluate job.
    assert trained["evaluation"]["miou"] == report["miou"] and trained["evaluation"]["predicted"] == len(demo.val)
    assert len(list((tmp_path / "train" / "evaluation" / "masks").glob("*.png"))) == len(demo.val)
    floor = all_background_miou([load_mask(demo.val.mask_uri(r)) for r in demo.val.records], len(demo.val.classes))
    print(f"deeplab demo val mIoU {report['miou']:.3f}, all-background {floor:.3f}")
    assert report["all_background_miou"] == pytest.approx(floor)
    assert report["miou"] > floor + 0.03
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["miou"] == report["miou"] and saved["images"] == len(demo.val)
    # Test-time flip and scales help; the dense CRF gives a valid report (on a network this weak it
    # can wash every digit out, so its score is not asserted).
    tta = run_training_job({"kind": "evaluate", "manifest": str(demo.root / "val.jsonl"),
                            "config": {**cfg, "test_scales": [1.0, 1.5], "test_flip": True},
                            "output": str(tmp_path / "eval_tta"), "checkpoint": trained["checkpoint"]})
    assert tta["miou"] > floor
    crf = run_training_job({"kind": "evaluate", "manifest": str(demo.root / "val.jsonl"),
                            "config": {**cfg, "use_crf": True},
                            "output": str(tmp_path / "eval_crf"), "checkpoint": trained["checkpoint"]})
    assert crf["images"] == len(demo.val) and 0 < crf["miou"] <= 1 and crf["miou"] != report["miou"]
    predicted = run_training_job({"kind": "predict", "manifest": str(demo.root / "val.jsonl"), "config": cfg,
                                  "output": str(tmp_path / "pred"), "checkpoint": trained["checkpoint"]})
    assert predicted["predicted"] == len(demo.val)
    mask = Image.open(tmp_path / "pred" / "masks" / f"{demo.val[0].id}.png")
    assert mask.mode == "P" and mask.size == (64, 64)
    assert set(np.unique(np.asarray(mask))) <= set(range(len(demo.val.classes) + 1))


@pytest.mark.heavy  # trains a network
def test_resume_continues_the_same_run(demo: DemoDataset, tmp_path: Path) -> None:
    """Stop after 3 of 6 steps (the state kept at step 3), resume: the same weights and losses as
    an uninterrupted run. DeepLabV3's head has dropout, so the RNG state must come back too."""
    torch.set_num_threads(2)
    subset = _subset(demo.train, 16)
    cfg = DeepLabTrainConfig(**{**TINY, "model": "deeplabv3", "batch_size": 2, "crop_size": 48, "iterations": 6,
                                "checkpoint_every": 3, "log_every": 2, "msc_scales": [0.5], "freeze_bn": False,
                                "lr": 1e-3})
    straight = train_deeplab(subset, tmp_path / "straight", cfg, progress=False)
    states = sorted(p.name for p in (tmp_path / "straight" / "checkpoints").iterdir())
    assert states == ["step_00000003.pth", "step_00000006.pth"]
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "straight" / "checkpoints" / states[0], tmp_path / "resumed" / "checkpoints")
    resumed = train_deeplab(subset, tmp_path / "resumed", cfg, progress=False)
    assert resumed["history"] == straight["history"] and resumed["steps"] == 6
    a, _, _ = load_deeplab(straight["checkpoint"])
    b, _, extra = load_deeplab(resumed["checkpoint"])
    assert _same_weights(a, b) and extra["steps"] == 6
    fresh = train_deeplab(subset, tmp_path / "fresh", cfg.model_copy(update={"seed": 1}), progress=False)
    assert not _same_weights(a, load_deeplab(fresh["checkpoint"])[0])  # the comparison can fail
    with pytest.raises(ValueError, match=r"other settings.*lr"):
        train_deeplab(subset, tmp_path / "resumed", cfg.model_copy(update={"lr": 0.5}), progress=False)


@pytest.mark.heavy  # starts processes
def test_ddp_with_torchrun_matches_one_process(demo: DemoDataset, tmp_path: Path) -> None:
    """Two gloo processes under torchrun, 2 images each, give the weights of one process with
    batches of 4: DistributedSampler splits each global batch, DDP averages the gradients."""
    subset = _subset(demo.train, 16)
    subset.save(tmp_path / "subset.jsonl")
    # Scale 1 at crop 64 = no padding, so each rank's mean loss has as many pixels as the other's.
    cfg = {**TINY, "iterations": 3, "scales": [1.0], "lr": 1e-3, "msc_scales": [0.5]}
    sets = [arg for k, v in cfg.items() for arg in ("--set", f"{k}={json.dumps(v)}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
                           "-m", "rib_core.cli", "deeplab", "train", str(tmp_path / "subset.jsonl"),
                           str(tmp_path / "ddp"), "--device", "cpu", "--quiet", *sets],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    torch.set_num_threads(2)
    single = train_deeplab(subset, tmp_path / "single", DeepLabTrainConfig(**cfg), progress=False)
    ddp_model, _, extra = load_deeplab(tmp_path / "ddp" / "deeplab.pth")
    one_model, _, _ = load_deeplab(single["checkpoint"])
    assert extra["world_size"] == 2 and single["world_size"] == 1
    for key, value in one_model.state_dict().items():
        torch.testing.assert_close(ddp_model.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert [h["loss"] for h in extra["history"]] == pytest.approx([h["loss"] for h in single["history"]], rel=1e-4)
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "step_00000003.pth", weights_only=True)
    assert len(state["rng"]) == 2 and state["world_size"] == 2


@pytest.mark.slow
def test_retraining_fills_ignored_pixels_and_trains_again(demo: DemoDataset, tmp_path: Path) -> None:
    """Appendix A.1 on demo scores: 3-way labels from a score map, round 1, fill, round 2."""
    torch.set_num_threads(2)
    records = []
    (tmp_path / "labels").mkdir()
    for r in demo.train.records[:8]:
        gt = load_mask(demo.train.mask_uri(r))
        keys = np.asarray(demo.train.label_indices(r))
        # A walk-like score map: 1 on each class's pixels, fading over two pixels around them.
        onehot = np.stack([(gt == k + 1).astype(np.float32) for k in keys])
        soft = np.maximum(onehot, 0.25 * np.stack([np.roll(o, s, a) for o in onehot for s in (1, 2) for a in (0, 1)]
                                                  ).reshape(len(keys), 4, *gt.shape).max(1))
        (tmp_path / "labels" / f"{r.id}.png").write_bytes(label_png(three_way_labels(soft, keys)))
        label_path = str(tmp_path / "labels" / f"{r.id}.png")
        records.append(ManifestRecord(r.id, demo.train.image_uri(r), r.labels, label_path))
    manifest = Manifest(demo.train.classes, records, str(tmp_path))
    first_labels = [load_mask(str(tmp_path / "labels" / f"{r.id}.png")) for r in records]
    assert all((lb == IGNORE_INDEX).any() for lb in first_labels)
    cfg = DeepLabTrainConfig(**{**TINY, "iterations": 4, "retrain": True, "retrain_init": "first_round"})
    result = train_with_retraining(manifest, tmp_path / "run", cfg, progress=False)
    assert result["filled_images"] == 8 and len(result["rounds"]) == 2
    for r, before in zip(records, first_labels, strict=True):
        after = load_mask(str(tmp_path / "run" / "filled" / f"{r.id}.png"))
        kept = before != IGNORE_INDEX
        assert (after != IGNORE_INDEX).all() and np.array_equal(after[kept], before[kept])
    filled_manifest = (tmp_path / "run" / "filled.jsonl").read_text()
    assert str(tmp_path / "run" / "filled") in filled_manifest
    final, _, extra = load_deeplab(tmp_path / "run" / "deeplab.pth")
    assert _same_weights(final, load_deeplab(result["rounds"][1]["checkpoint"])[0])
    assert extra["config"]["init_weights"] == result["rounds"][0]["checkpoint"]  # round 2 started from round 1


def test_jobs_with_s3_resume_and_bad_specs(demo: DemoDataset, classifier_path: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(2)
    with moto_s3() as endpoint:
        for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                     "AWS_DEFAULT_REGION": "us-east-1", "RIB_WORK_DIR": str(tmp_path / "work1")}.items():
            monkeypatch.setenv(k, v)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="jobs")
        client.put_object(Bucket="jobs", Key="weights/classifier.pth", Body=classifier_path.read_bytes())
        subset = _subset(demo.train, 8)
        subset.save(tmp_path / "subset.jsonl")
        spec = {"kind": "train", "manifest": str(tmp_path / "subset.jsonl"), "output": "s3://jobs/run1",
                "config": {**TINY, "iterations": 3, "checkpoint_every": 1,
                           "init_weights": "s3://jobs/weights/classifier.pth"}}
        trained = run_training_job(spec)
        assert trained["checkpoint"] == "s3://jobs/run1/deeplab.pth"
        keys = {o["Key"] for o in client.list_objects_v2(Bucket="jobs", Prefix="run1/")["Contents"]}
        assert {k for k in keys if "checkpoints" in k} == {"run1/checkpoints/step_00000002.pth",
                                                             "run1/checkpoints/step_00000003.pth"}  # the last 2
        assert {"run1/deeplab.pth", "run1/train_report.json"} <= keys
        # A fresh machine (empty work folder) resumes from the states in S3: nothing left to train.
        monkeypatch.setenv("RIB_WORK_DIR", str(tmp_path / "work2"))
        again = run_training_job(spec)
        assert again["history"] == trained["history"]
        assert _same_weights(load_deeplab("s3://jobs/run1/deeplab.pth")[0],
                             load_deeplab(tmp_path / "work1" / "rib-deeplab" / next(
                                 iter(os.listdir(tmp_path / "work1" / "rib-deeplab"))) / "deeplab.pth")[0])
        val = _subset(demo.val, 2)
        val.save(tmp_path / "val.jsonl")
        report = run_training_job({"kind": "evaluate", "manifest": str(tmp_path / "val.jsonl"),
                                   "output": "s3://jobs/eval", "checkpoint": trained["checkpoint"],
                                   "config": spec["config"]})
        stored = json.loads(client.get_object(Bucket="jobs", Key="eval/report.json")["Body"].read())
        assert stored["miou"] == report["miou"] and stored["images"] == 2
        predicted = run_training_job({"kind": "predict", "manifest": str(tmp_path / "val.jsonl"),
                                      "output": "s3://jobs/pred", "checkpoint": trained["checkpoint"]})
        assert predicted == {"kind": "predict", "predicted": 2, "masks": "s3://jobs/pred/masks"}
        body = client.get_object(Bucket="jobs", Key=f"pred/masks/{val[0].id}.png")["Body"].read()
        assert body[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="needs a 'checkpoint'"):
        run_training_job({"kind": "evaluate", "manifest": "m.jsonl", "output": str(tmp_path)})
    with pytest.raises(ValueError, match="kind must be"):
        run_training_job({"kind": "dance", "manifest": "m.jsonl", "output": str(tmp_path)})
    with pytest.raises(ValueError, match="no mask"):
        unlabelled = Manifest(demo.train.classes, [ManifestRecord(r.id, demo.train.image_uri(r), r.labels)
                                                   for r in demo.train.records[:4]])
        train_deeplab(unlabelled, tmp_path / "x", DeepLabTrainConfig(**{**TINY, "iterations": 1}), progress=False)
