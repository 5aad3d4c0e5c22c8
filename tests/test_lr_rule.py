"""RIB's ``first_step`` step-size rule: the step it picks follows the classifier's gradient scale,
its first step lowers L_RIB by the asked fraction, and both engines give every image its own step.
Real demo scenes through a real ResNet-18 (untrained: the rule must hold for any weights)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from rib_core.config.rib_config import RibConfig
from rib_core.data.datasets import load_image
from rib_core.rib.companions import CompanionPool
from rib_core.rib.engines import PlainEngine, TrainablePart
from rib_core.rib.objective import first_step_lr, pool_images, rib_loss
from rib_core.rib.process import RibRunner
from rib_core.training.augment import multiscale_flip_batches
from rib_core.training.networks import CamNet

RULE = RibConfig(lr_rule="first_step", step_gain=1e-3, iterations=2, companions=2, crop_size=32,
                 resize_long=(32, 64))


@pytest.fixture(scope="module")
def network(demo) -> tuple[CamNet, CompanionPool, list[np.ndarray], list[list[int]]]:
    torch.manual_seed(0)
    model = CamNet(len(demo.train.classes), "resnet18")
    records = demo.train.records[:3]
    return (model, CompanionPool.from_manifest(demo.train, limit=40),
            [load_image(demo.train.image_uri(r)) for r in records], [demo.train.label_indices(r) for r in records])


def _engine(model: CamNet, cfg: RibConfig) -> PlainEngine:
    work = copy.deepcopy(model)
    work.set_bn_frozen(True)
    return PlainEngine(work, model.state_dict(), TrainablePart(work), cfg, cfg.plan("cpu"), torch.device("cpu"))


def _loss(engine: PlainEngine, low: torch.Tensor, labels: torch.Tensor, cfg: RibConfig) -> tuple[torch.Tensor, ...]:
    logits = pool_images(engine.cams(low), labels, cfg)
    return logits, rib_loss(logits, labels)


def test_the_step_scales_inversely_with_the_gradient_scale_and_sets_the_first_decrease(network):
    model, _, images, keys = network
    engine = _engine(model, RULE)
    low = engine.low(multiscale_flip_batches(images[0], (1.0,))[0][None])
    labels = torch.zeros(1, 2, model.num_classes)
    labels[:, :, keys[0]] = 1.0
    logits, loss = _loss(engine, low, labels, RULE)
    lr = first_step_lr(logits, labels, engine.weighted_grad_sq(loss.sum()), RULE.step_gain)
    # A classifier whose logits (hence gradients) are 10x larger gets a 10x smaller step.
    tenfold = first_step_lr(10 * logits, labels, engine.weighted_grad_sq(10 * loss.sum()), RULE.step_gain)
    assert tenfold.item() == pytest.approx(lr.item() / 10, rel=1e-4)
    # The step taken (the loss scaled by lr / RibConfig.lr, as fine_tune does) lowers L_RIB by
    # about step_gain x sum |y|, the rule's definition, to first order.
    engine.update((loss * lr / RULE.lr).sum(), [])
    with torch.no_grad():
        _, after = _loss(engine, low, labels, RULE)
    asked = RULE.step_gain * (logits.detach() * labels).abs().sum()
    assert (loss.detach() - after).item() == pytest.approx(asked.item(), rel=0.2)


def test_fixed_rule_keeps_the_configured_lr_and_the_rule_gives_each_image_its_own(network):
    model, pool, images, keys = network
    runner = RibRunner(model, pool, RULE)
    fixed = runner.run(images[0], keys[0], RULE.model_copy(update={"lr_rule": "fixed"}), seed=0)
    assert fixed.lr == pytest.approx(RULE.lr)
    alone = [runner.run(im, k, seed=j) for j, (im, k) in enumerate(zip(images, keys, strict=True))]
    together = runner.run_many(images, keys, seeds=[0, 1, 2], device_crops=False)
    assert len({round(o.lr, 12) for o in alone}) == len(images)  # each image's own gradient, its own step
    for a, b in zip(alone, together, strict=True):
        assert b.lr == pytest.approx(a.lr, rel=1e-4)
        np.testing.assert_allclose(a.map.high_res, b.map.high_res, atol=1e-4)
        assert a.stats()["lr"] == a.lr
