"""A demo run reproduces (issue 24): two ``rib demo`` runs of one small config, each in a fresh
process with its own PYTHONHASHSEED but the same seeds and torch thread count, write bit-identical
data, weights (and training states), maps and masks, and the same figures.

The thread count is part of the condition: it decides the order of float reductions in the
convolutions and matrix products, and a different order gives a different trajectory.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rib_core.config.network_configs import ClassifierTrainConfig
from rib_core.config.rib_config import RibConfig
from rib_core.config.stage_configs import IrnTrainConfig, RefineConfig
from rib_core.data.demo_data import DemoDataConfig
from rib_core.experiments.demo_job import DemoJobConfig

# Every stage of the demo, each as small as it runs: pretraining, two classifier epochs (the
# second one resumed in the same process, as the demo does), CAM, RIB with the prefetch thread, IRN.
TINY = DemoJobConfig(
    data=DemoDataConfig(n_train=48, n_val=16, canvas=64, digit_size=(26, 40), digits=[0, 1, 2, 3, 4],
                        max_per_image=2),
    pretrain=ClassifierTrainConfig(recipe="scratch", batch_size=16, epochs=1, crop_size=32, resize_long=(30, 34)),
    pretrain_images=64,
    classifier=ClassifierTrainConfig(recipe="scratch", arch="resnet18", batch_size=16, epochs=2, crop_size=56,
                                     resize_long=(48, 80)),
    n_images=6, report_rows=2,
    rib=RibConfig(iterations=3, companions=2, crop_size=64, resize_long=(48, 80)),
    refine=RefineConfig(irn=IrnTrainConfig(arch="resnet18", crop_size=64, batch_size=4, epochs=1, radius=5)),
)


def _demo(out: Path, config: Path, hash_seed: int) -> dict[str, Any]:
    """``rib demo`` into ``out`` in a fresh process; returns its report.json."""
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "RIB_TORCH_THREADS": "2"}
    subprocess.run([sys.executable, "-m", "rib_core.cli", "demo", "--config", str(config), "--out", str(out),
                    "--quiet", "--device", "cpu"], check=True, env=env, capture_output=True, timeout=1800)
    return json.loads((out / "report.json").read_text())


def _tensors(obj: Any, name: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint (model, optimiser and RNG states), by its path in the file."""
    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k], f"{name}/{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{name}/{i}")


def _digest(path: Path) -> str:
    """The content that must reproduce: a checkpoint's tensors, a map's arrays, a picture's bytes
    (text files hold the run's folder, date and times)."""
    h = hashlib.sha256()
    if path.suffix == ".pth":
        for name, t in _tensors(torch.load(path, map_location="cpu", weights_only=True)):
            h.update(name.encode())
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif path.suffix == ".npz":
        with np.load(path) as z:
            for k in sorted(z.files):
                h.update(k.encode())
                h.update(np.ascontiguousarray(z[k]).tobytes())
    else:
        h.update(path.read_bytes())
    return h.hexdigest()


def _outputs(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): _digest(p) for p in sorted(out.rglob("*"))
            if p.is_file() and p.suffix in (".pth", ".npz", ".png")}


@pytest.mark.heavy  # trains the demo's networks twice
def test_two_demo_runs_with_the_same_seeds_and_threads_are_bit_identical(tmp_path):
    config = tmp_path / "demo.json"
    config.write_text(TINY.model_dump_json())
    first, second = _demo(tmp_path / "a", config, 1), _demo(tmp_path / "b", config, 2)
    files_a, files_b = _outputs(tmp_path / "a"), _outputs(tmp_path / "b")
    assert any(f.startswith("maps/") for f in files_a) and "refined/irn.pth" in files_a
    assert sorted(files_a) == sorted(files_b)
    assert [f for f in files_a if files_a[f] != files_b[f]] == []
    for key in ("metrics", "rows", "cam_seed", "rib_seed"):
        assert first[key] == second[key], key
    assert first["classifier"]["map"] == second["classifier"]["map"]
    assert first["run"]["machine"]["torch_threads"] == second["run"]["machine"]["torch_threads"] == 2
