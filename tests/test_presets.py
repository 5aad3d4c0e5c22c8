"""``preset: voc | coco``: the authors' COCO settings for RIB, refinement and evaluation, explicit
values winning over the preset, and the official COCO pooling quirk (GNDRP on 20 classes only)."""

from __future__ import annotations

import argparse

import pytest
import torch
from pydantic import ValidationError

from rib_core.cli.options import build_config
from rib_core.config.network_configs import DEEPLAB_CRF, DeepLabTrainConfig
from rib_core.config.rib_config import RibConfig
from rib_core.config.stage_configs import (
    ConfidentLabelConfig,
    EvalConfig,
    IrnTrainConfig,
    RandomWalkConfig,
    RefineConfig,
)
from rib_core.experiments.demo_job import DemoJobConfig
from rib_core.rib.objective import gap, gndrp, pool

COCO_SWEEP = [round(t / 100, 2) for t in range(10, 51)]  # run_sample_coco.py: 0.10 ... 0.50


def test_coco_preset_sets_the_authors_rib_values() -> None:
    coco, voc = RibConfig(preset="coco"), RibConfig()
    assert (coco.lr, coco.companions, coco.tau, coco.margin, coco.explode_ratio) == (5e-6, 15, 0.5, 1000, 0.8)
    assert coco.gndrp_classes == 20  # obtain_RIB_CAM_coco.py's gndp2d
    assert (voc.preset, voc.lr, voc.companions, voc.tau, voc.margin, voc.explode_ratio, voc.gndrp_classes) == (
        "voc", 8e-6, 20, 0.4, 600, 0.7, None)
    same = {"iterations", "weight_decay", "momentum", "explode_threshold", "loss_scales", "map_scales", "crop_size"}
    assert {k: getattr(coco, k) for k in same} == {k: getattr(voc, k) for k in same}
    assert RibConfig.model_validate(coco.model_dump()) == coco  # a dumped config reads back the same


def test_coco_preset_sets_the_walk_threshold() -> None:
    assert RandomWalkConfig(preset="coco").bg_threshold == 0.22
    assert RandomWalkConfig().bg_threshold == 0.27


def test_coco_preset_sets_the_seed_sweep() -> None:
    assert EvalConfig(preset="coco").thresholds == COCO_SWEEP
    assert EvalConfig().thresholds == [round(t / 100, 2) for t in range(20, 50)]  # run_sample.py: 0.20 ... 0.49


def test_coco_preset_reaches_every_part_of_refinement() -> None:
    coco = RefineConfig(preset="coco")
    assert coco.walk.bg_threshold == 0.22 and coco.walk.preset == "coco"
    assert coco.evaluation.thresholds == COCO_SWEEP
    # The confident labels and IRN training are the same in both official runs.
    assert coco.labels == ConfidentLabelConfig() and coco.irn == IrnTrainConfig()
    assert RefineConfig().walk.bg_threshold == 0.27


def test_explicit_values_override_the_preset() -> None:
    rib = RibConfig(preset="coco", lr=1e-5, gndrp_classes=None)
    assert (rib.lr, rib.gndrp_classes, rib.companions, rib.tau) == (1e-5, None, 15, 0.5)
    assert EvalConfig(preset="coco", thresholds=[0.3]).thresholds == [0.3]
    refine = RefineConfig(preset="coco", walk={"beta": 5})  # a part given in part keeps the preset's rest
    assert (refine.walk.beta, refine.walk.bg_threshold, refine.evaluation.thresholds) == (5, 0.22, COCO_SWEEP)
    refine = RefineConfig(preset="coco", walk={"bg_threshold": 0.3}, evaluation={"preset": "voc"})
    assert refine.walk.bg_threshold == 0.3 and refine.evaluation.thresholds == EvalConfig().thresholds
    args = argparse.Namespace(config=None, set=["preset=coco", "companions=4"])  # rib rib --set ...
    assert (build_config(RibConfig, args).companions, build_config(RibConfig, args).lr) == (4, 5e-6)
    # A nested section given in part keeps the rest of that field's default, at every depth (the
    # demo's pretraining and IRN recipes, DeepLab's CRF), not the nested class's own defaults.
    demo = build_config(DemoJobConfig, argparse.Namespace(config=None, set=["pretrain.epochs=1",
                                                                            "refine.walk.beta=5"]))
    assert (demo.pretrain.epochs, demo.pretrain.crop_size) == (1, DemoJobConfig().pretrain.crop_size)
    assert demo.refine.irn == DemoJobConfig().refine.irn and demo.refine.walk.beta == 5
    assert demo.refine.walk.exp_times == DemoJobConfig().refine.walk.exp_times
    crf = build_config(DeepLabTrainConfig, argparse.Namespace(config=None, set=["crf.iterations=5"])).crf
    assert crf == DEEPLAB_CRF.model_copy(update={"iterations": 5})
    for cls in (RibConfig, RandomWalkConfig, EvalConfig, RefineConfig):
        with pytest.raises(ValidationError, match="unknown preset 'ade'"):
            cls(preset="ade")


def test_coco_pooling_quirk_pools_classes_from_20_by_gap() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 80, 6, 7)
    labels = torch.zeros(2, 80)
    labels[0, [3, 25]] = 1
    labels[1, [19, 20, 79]] = 1
    quirk = gndrp(x, labels, tau=0.5, classes=20)
    assert torch.allclose(quirk[:, 20:], gap(x)[:, 20:])  # labelled or not, classes >= 20 pool by GAP
    assert torch.allclose(quirk[:, :20], gndrp(x, labels, tau=0.5)[:, :20])  # the first 20: GNDRP
    everywhere = gndrp(x, labels, tau=0.5)  # the option off: labelled classes >= 20 leave pixels out
    assert (everywhere[0, 25] < gap(x)[0, 25]) and (everywhere[1, 79] < gap(x)[1, 79])
    assert torch.equal(pool(x, labels, RibConfig(preset="coco")), quirk)
    assert torch.equal(pool(x, labels, RibConfig(preset="coco", gndrp_classes=None)), everywhere)
