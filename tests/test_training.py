"""The training skeleton shared by the classifier, IRN and DeepLab (rib_core.training.loop): its refusals,
its epoch loop and its resume state, on tiny parts (no network is trained here)."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from rib_core.classifier.train import ClassifierTrainConfig, train_classifier
from rib_core.data.datasets import Manifest, ManifestRecord
from rib_core.training import loop
from rib_core.training.checkpoints import CheckpointError
from tests.planted import RunsCode


def test_planted_classifier_state_is_refused_without_running_its_code(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": {}, "optimizer": {}, "epoch": 1, "payload": RunsCode(marker)}, out / "train_state.pth")
    manifest = Manifest(["a"], [ManifestRecord("x", "x.png", ("a",), None)], str(tmp_path))
    cfg = ClassifierTrainConfig(arch="resnet18", batch_size=1, epochs=2)
    with pytest.raises(CheckpointError, match=r"refusing to resume from .*train_state\.pth"):
        train_classifier(manifest, out, cfg, progress=False)
    assert not marker.exists()


def test_a_state_without_the_keys_of_a_training_state_is_refused(tmp_path: Path) -> None:
    loop.save_training_state({"model": {}}, tmp_path / "states" / "s.pth")  # the folder is created
    with pytest.raises(CheckpointError, match="not a training state of this program"):
        loop.read_training_state(tmp_path / "states" / "s.pth", ("model", "optimizer", "epoch"))


def test_steps_per_epoch_drops_the_partial_batch_and_refuses_none() -> None:
    assert loop.steps_per_epoch(10, 4) == 2
    assert loop.steps_per_epoch(10, 4, world=2) == 2  # 5 images per rank, batches of 2
    with pytest.raises(ValueError, match="3 images is fewer than one batch of 4"):
        loop.steps_per_epoch(3, 4)


def test_one_epoch_steps_sums_and_stops_when_told(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    start = copy.deepcopy(loop.trainer_state(model, optimizer))
    batches = [torch.ones(1, 2) * i for i in range(5)]
    seen: list[float] = []

    def step_loss(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss = model(x).pow(2).mean()
        return loss, {"twice": 2 * loss.item()}

    def after_step(loss: float) -> bool:
        seen.append(loss)
        return len(seen) == 3

    with loop.progress_bar(5, "test", enabled=False) as bar:
        sums = loop.train_one_epoch(batches, step_loss, optimizer, bar, after_step=after_step)
    assert len(seen) == 3
    assert sums["loss"] == pytest.approx(sum(seen))
    assert sums["twice"] == pytest.approx(2 * sum(seen))
    assert not torch.equal(model.weight, start["model"]["weight"])
    loop.restore_trainer(start, model, optimizer)
    assert torch.equal(model.weight, start["model"]["weight"])


def test_augmented_samples_depend_on_seed_epoch_and_index_only(tmp_path: Path) -> None:
    class Draws(loop.AugmentedManifest):
        def sample(self, record: ManifestRecord, rng: random.Random) -> dict[str, Any]:
            return {"id": record.id, "draw": rng.random()}

    manifest = Manifest(["a"], [ManifestRecord(f"x{i}", f"x{i}.png", ("a",), None) for i in range(3)],
                        str(tmp_path))
    data = Draws(manifest, seed=1)
    first = [data[i]["draw"] for i in range(3)]
    assert [data[i]["draw"] for i in (2, 1, 0)] == first[::-1]  # any order, the same draws
    data.epoch = 1
    assert [data[i]["draw"] for i in range(3)] != first
    assert len(data) == 3
