"""Class activation maps as IRN computes them (``step/make_cam.py``); the map file format is
:mod:`rib_core.io.localization_map`'s."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from rib_core.data.datasets import Manifest, load_image
from rib_core.io.localization_map import LocalizationMap
from rib_core.training.augment import multiscale_flip_batches, strided_size, strided_up_size
from rib_core.training.networks import CamNet


class CamConfig(BaseModel):
    """Multi-scale CAM inference."""

    model_config = ConfigDict(extra="forbid")

    scales: tuple[float, ...] = Field((1.0, 0.5, 1.5, 2.0),  # IRN run_sample.py --cam_scales
                                      description="input scales, each with its horizontal flip")


def flip_fused(raw: torch.Tensor) -> torch.Tensor:
    """[..., 2, C, h, w] raw CAMs of an image and its mirror -> ReLU, un-mirror, sum: [..., C, h, w]."""
    cams = F.relu(raw)
    return cams[..., 0, :, :, :] + cams[..., 1, :, :, :].flip(-1)


def normalise_per_class(x: torch.Tensor) -> torch.Tensor:
    """Divide each class map by its maximum (+1e-5 as IRN, so an all-zero map stays zero)."""
    return x / (F.adaptive_max_pool2d(x, (1, 1)) + 1e-5)


def assemble_map(per_scale: Sequence[torch.Tensor], size: tuple[int, int],
                 keys: Sequence[int]) -> LocalizationMap:
    """Sum per-scale maps [C, h_s, w_s] at stride 4 and at full size, keep ``keys``, normalise.

    IRN's ``make_cam.py`` (and RIB's ``save_npy``): bilinear to ceil(size / 4) for the strided map;
    to the stride-16-aligned size, then cropped, for the full-resolution map.
    """
    keys_t = torch.as_tensor(list(keys), dtype=torch.long)
    s4 = strided_size(size, 4)
    up = strided_up_size(size, 16)
    strided = sum(F.interpolate(m[None], s4, mode="bilinear", align_corners=False)[0] for m in per_scale)
    high = sum(F.interpolate(m[:, None], up, mode="bilinear", align_corners=False)[:, 0]
               for m in per_scale)[:, :size[0], :size[1]]
    strided = normalise_per_class(strided[keys_t])
    high = normalise_per_class(high[keys_t])
    return LocalizationMap(keys_t.numpy(), strided.float().cpu().numpy(), high.float().cpu().numpy())


@torch.no_grad()
def compute_cam(model: CamNet, image: np.ndarray, keys: Sequence[int], cfg: CamConfig | None = None,
                device: torch.device | str = "cpu") -> LocalizationMap:
    """The CAM of one uint8 RGB image for its labelled classes ``keys``."""
    cfg = cfg or CamConfig()
    per_scale = [flip_fused(model.cam(batch.to(device))).cpu()
                 for batch in multiscale_flip_batches(image, cfg.scales)]
    return assemble_map(per_scale, image.shape[:2], keys)


def run_cam(model: CamNet, manifest: Manifest, out_dir: str | os.PathLike[str],
            cfg: CamConfig | None = None, device: torch.device | str = "cpu",
            progress: bool = True) -> Path:
    """CAMs of every image of a manifest, written as ``out_dir/<id>.npz``. Skips existing files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().to(device)
    for r in tqdm(manifest.records, desc="cam", disable=not progress, unit="img"):
        path = out / f"{r.id}.npz"
        if path.exists():
            continue
        m = compute_cam(model, load_image(manifest.image_uri(r)), manifest.label_indices(r), cfg, device)
        m.save(path)
    return out
