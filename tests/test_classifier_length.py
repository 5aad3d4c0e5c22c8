"""The classifier's length by its validation curve (``stop="plateau"``): the rule on given curves, a
real training that the rule ends and whose best epoch is the one written, and resuming across the
stop (one epoch per call, as the pipeline's classifier stage runs it, and after a crash between
the last state and the checkpoint); and the pretraining data of the benchmark's large-digit scenes."""

from __future__ import annotations

import json

import pytest
import torch

from rib_core.classifier.train import ClassifierTrainConfig, plateau, train_classifier
from rib_core.data.demo_data import DemoDataConfig, make_demo_dataset
from rib_core.experiments.demo_job import DemoJobConfig, single_digits
from rib_core.jobs.stages import classifier_stage
from rib_core.training.checkpoints import load_classifier, read_checkpoint
from tests.test_classifier_quality import TINY

# The rule on a real run: epoch 1 always improves, and with min_delta 0.99 no later epoch can, so
# the run ends after 1 + patience epochs of its 5; which of them is best is the curve's to say.
RULE = TINY.model_copy(update={"stop": "plateau", "epochs": 5, "patience": 2, "min_delta": 0.99})


def test_the_rule_on_given_curves():
    assert plateau([0.5, 0.7, 0.69, 0.68], patience=2, min_delta=0.0) == (2, True)
    assert plateau([0.5, 0.7, 0.69], patience=2, min_delta=0.0) == (2, False)
    # a rise below min_delta is kept (the best weights) but does not reset the patience
    assert plateau([0.5, 0.7, 0.704, 0.703], patience=2, min_delta=0.005) == (3, True)
    # small rises that add up past min_delta count as an improvement
    assert plateau([0.5, 0.7, 0.704, 0.708], patience=2, min_delta=0.005) == (4, False)
    assert plateau([], patience=1, min_delta=0.0) == (0, False)


def test_plateau_needs_a_validation_manifest_and_irn_stays_fixed(demo, tmp_path):
    assert ClassifierTrainConfig().stop == "fixed" and ClassifierTrainConfig().epochs == 5  # IRN's recipe
    with pytest.raises(ValueError, match="validation manifest"):
        train_classifier(demo.train, tmp_path, RULE, progress=False)
    assert not (tmp_path / "train_state.pth").exists()


def _weights(path):
    return load_classifier(path)[0].state_dict()


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.heavy  # trains a network
def test_the_rule_ends_training_keeps_the_best_epoch_and_resumes_across_the_stop(demo, tmp_path):
    small = demo.train.subset([r.id for r in demo.train.records[:16]])
    val = demo.root / "val.jsonl"
    straight = train_classifier(small, tmp_path / "straight", RULE, progress=False, val_manifest=val)
    history = load_classifier(straight)[2]["history"]
    maps = [row["map"] for row in history]
    assert len(history) == 1 + RULE.patience < RULE.epochs  # ended by the rule, before the maximum
    kept = maps.index(max(maps)) + 1
    validation = load_classifier(straight)[2]["validation"]
    assert (validation["epoch"], validation["epochs_run"], validation["map"]) == (kept, len(history), max(maps))
    report = json.loads((tmp_path / "straight" / "train_report.json").read_text())
    assert (report["epoch_kept"], report["ended_by_rule"]) == (kept, True)

    # The written weights are the kept epoch's: those of a fixed run of the maximal length (the
    # same schedule, the rule only cuts it) stopped after that epoch.
    fixed = RULE.model_copy(update={"stop": "fixed"})
    state = train_classifier(small, tmp_path / "fixed", fixed, progress=False, val_manifest=val,
                             stop_after_epoch=kept)
    written = _weights(straight)
    reference = read_checkpoint(state)["model"]
    for k in reference:
        assert torch.equal(reference[k].float(), written[k].float()), k

    # One epoch per call (the pipeline's classifier stage) gives the same run and the same weights
    report = classifier_stage(tmp_path / "staged", small, RULE, val)
    assert [row["map"] for row in report["history"]] == maps
    _same(_weights(tmp_path / "staged" / "classifier" / "classifier.pth"), written)

    # A crash after the last state, before the checkpoint: the next call writes it without training
    (tmp_path / "staged" / "classifier" / "classifier.pth").unlink()
    again = train_classifier(small, tmp_path / "staged" / "classifier", RULE, progress=False, val_manifest=val)
    assert len(load_classifier(again)[2]["history"]) == len(history)
    _same(_weights(again), written)


def test_digits_larger_than_the_pretraining_crop_are_drawn_at_its_side(tmp_path):
    """Scenes of 60-100 px digits (issue 24's unseen recipe) get single-digit pretraining data."""
    demo = DemoJobConfig()
    scenes = DemoDataConfig(canvas=128, digit_size=(60, 100), background="texture", colour="grey")
    single = single_digits(scenes, demo.pretrain, 3, scale=1.0)
    assert single.digit_size == (demo.pretrain.crop_size,) * 2 and single.canvas == demo.pretrain.crop_size
    data = make_demo_dataset(tmp_path, single.model_copy(update={"n_val": 1}))
    assert all(len(r.labels) == 1 for r in data.train.records)
