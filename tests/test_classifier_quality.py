"""The classifier's quality report: AP and mAP against independent computations, the recorded
validation in the checkpoint, the weak-classifier warning, ``rib eval-classifier`` on ours and on
IRN's layout, the from-scratch recipe, and the scene knobs of the demo data."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from rib_core.classifier.evaluate import WEAK_CAUSE, average_precision, classification_scores, classifier_quality
from rib_core.classifier.train import ClassifierTrainConfig, train_classifier
from rib_core.data.datasets import load_image
from rib_core.data.demo_data import DemoDataConfig, make_demo_dataset
from rib_core.training.augment import normalize, to_chw
from rib_core.training.checkpoints import load_classifier
from tests.test_foundations import _IrnLayoutNet

TINY = ClassifierTrainConfig(recipe="scratch", batch_size=8, epochs=2, crop_size=48, resize_long=(40, 56))


def _ap_by_pairs(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP as the mean over positives p of P(label | score >= score_p): no sorting, no cumsum."""
    pos = np.flatnonzero(labels)
    return float(np.mean([labels[scores >= scores[p]].mean() for p in pos]))


def test_average_precision_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = np.array([1, 0, 1, 0, 1])
    # positives ranked 1, 3, 5: precisions 1/1, 2/3, 3/5
    assert average_precision(scores, labels) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert average_precision(scores, np.array([0, 0, 0, 0, 1])) == pytest.approx(1 / 5)
    assert np.isnan(average_precision(scores, np.zeros(5)))
    logits = np.array([[2.0, -1.0], [1.0, 3.0], [-0.5, 0.2], [-3.0, -2.0]])
    labels2 = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    s = classification_scores(logits, labels2, ["a", "b"])
    # a: ranked 1, 3 -> (1 + 2/3) / 2; b: ranked 1, 2 -> 1
    assert s["ap"] == {"a": pytest.approx(5 / 6), "b": pytest.approx(1.0)}
    assert s["map"] == pytest.approx((5 / 6 + 1) / 2)
    # at logit 0: a predicts rows 0, 1 (tp 1, fp 1, fn 1), b rows 1, 2 (tp 2)
    assert s["f1_per_class"] == {"a": pytest.approx(0.5), "b": pytest.approx(1.0)}
    assert s["f1_micro"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    small = demo.train.subset([r.id for r in demo.train.records[:32]])
    ckpt = train_classifier(small, out, TINY, progress=False, val_manifest=demo.root / "val.jsonl")
    return ckpt, demo


def test_report_map_equals_an_independent_computation(trained):
    ckpt, demo = trained
    report = json.loads((ckpt.parent / "train_report.json").read_text())
    assert [e["epoch"] for e in report["epochs"]] == [1, 2]
    assert report["val_manifest"] == str(demo.root / "val.jsonl")
    model, classes, extra = load_classifier(ckpt)
    # One image at a time through the saved model (IRN layout, stored statistics).
    with torch.no_grad():
        logits = np.stack([model.logits(to_chw(normalize(load_image(demo.val.image_uri(r))))[None])[0].numpy()
                           for r in demo.val.records])
    labels = np.stack([demo.val.label_vector(r) for r in demo.val.records])
    aps = {c: _ap_by_pairs(logits[:, i], labels[:, i]) for i, c in enumerate(classes) if labels[:, i].any()}
    last = report["epochs"][-1]
    assert last["images"] == len(demo.val)
    for c, ap in aps.items():
        assert last["ap"][c] == pytest.approx(ap, abs=1e-5), c
    assert last["map"] == pytest.approx(np.mean(list(aps.values())), abs=1e-5)
    validation = extra["validation"]
    assert validation["map"] == last["map"] and validation["manifest"] == str(demo.root / "val.jsonl")
    quality = classifier_quality(ckpt)
    assert quality["checkpoint"] == str(ckpt) and quality["val_map"] == last["map"]


def test_quality_warning_names_the_cause():
    weak = classifier_quality({"validation": {"map": 0.52, "manifest": "val.jsonl", "images": 50}}, checkpoint="c.pth")
    assert weak["val_map"] == 0.52 and "52.0%" in weak["summary"] and "c.pth" in weak["summary"]
    assert "below 80%" in weak["warning"] and WEAK_CAUSE in weak["warning"]
    assert classifier_quality({"validation": {"map": 0.95, "manifest": "v", "images": 9}})["warning"] is None
    unknown = classifier_quality({"source": "irn-official"})
    assert unknown["val_map"] is None and "not recorded" in unknown["summary"] and unknown["warning"] is None
    assert classifier_quality({"validation": {"map": 0.85}}, threshold=0.9)["warning"] is not None


def _rib(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rib_core.cli", *args], capture_output=True, text=True, timeout=300)


def test_eval_classifier_command_on_ours_and_irn_layout(trained, tmp_path):
    ckpt, demo = trained
    val = str(demo.root / "val.jsonl")
    done = _rib("eval-classifier", str(ckpt), val, "--report", str(tmp_path / "r.json"), "--device", "cpu")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    recorded = json.loads((ckpt.parent / "train_report.json").read_text())["epochs"][-1]
    assert report["map"] == pytest.approx(recorded["map"], abs=1e-6) and f"mAP {100 * report['map']:.1f}" in done.stdout
    torch.manual_seed(0)
    torch.save(_IrnLayoutNet(len(demo.val.classes)).state_dict(), tmp_path / "res50_cam.pth")
    official = _rib("eval-classifier", str(tmp_path / "res50_cam.pth"), val, "--report", str(tmp_path / "o.json"),
                    "--device", "cpu")
    assert official.returncode == 0, official.stderr
    assert "not recorded" in official.stdout
    assert set(json.loads((tmp_path / "o.json").read_text())["ap"]) == set(demo.val.classes)
    cam = _rib("cam", str(ckpt), val, str(tmp_path / "cam"), "--device", "cpu", "--quiet")
    assert cam.returncode == 0 and f"validation mAP {100 * recorded['map']:.1f}%" in cam.stderr


@pytest.mark.heavy  # trains a network
def test_scratch_recipe_fills_its_defaults_and_resumes(demo, tmp_path):
    cfg = ClassifierTrainConfig(recipe="scratch", lr=1e-3)
    assert cfg.lr == 1e-3 and cfg.from_scratch and cfg.colour_augment and cfg.warmup_epochs > 0
    assert ClassifierTrainConfig().lr == 0.1 and not ClassifierTrainConfig().from_scratch  # IRN's stays default
    small = demo.train.subset([r.id for r in demo.train.records[:16]])
    straight = train_classifier(small, tmp_path / "straight", TINY, progress=False)
    interrupted = train_classifier(small, tmp_path / "resumed", TINY, progress=False, stop_after_epoch=1)
    assert interrupted.name == "train_state.pth"
    resumed = train_classifier(small, tmp_path / "resumed", TINY, progress=False)
    a, b = load_classifier(straight)[0].state_dict(), load_classifier(resumed)[0].state_dict()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k


def test_scene_knobs(tmp_path):
    cfg = DemoDataConfig(n_train=6, n_val=1, canvas=112, digit_size=(30, 40), min_per_image=3, max_per_image=3,
                         background="texture", colour="grey", seed=3)
    data = make_demo_dataset(tmp_path, cfg)
    for r in data.train.records:
        assert len(r.labels) == 3
        img = load_image(data.train.image_uri(r))
        assert img.shape == (112, 112, 3) and np.array_equal(img[..., 0], img[..., 2])
        assert img.std() > 5
    flat = make_demo_dataset(tmp_path / "flat", DemoDataConfig(n_train=2, n_val=1, canvas=64, digit_size=(26, 40),
                                                               background="flat"))
    img = load_image(flat.train.image_uri(flat.train.records[0])).reshape(-1, 3)
    _, counts = np.unique(img, axis=0, return_counts=True)
    assert counts.max() > 0.5 * len(img)  # one background colour
    with pytest.raises(ValueError, match="min_per_image"):
        DemoDataConfig(min_per_image=3, max_per_image=2)
