"""The toy experiment's data (paper section 3.1, Figure 1a): real MNIST '2's and '8's on a larger canvas,
10% of them with a small circle or square beside the digit, and each pixel's region (digit R_D, shape R_ND,
background R_BG). :mod:`rib_core.experiments.toy` trains on it and measures what each layer passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, Field, model_validator

from rib_core.data.demo_data import _mnist

REGIONS: tuple[str, ...] = ("R_D", "R_ND", "R_BG")
D, ND, BG = 0, 1, 2  # region codes, in the order of REGIONS
MNIST_SIDE = 28


class ToyConfig(BaseModel):
    """Data, classifier, gradient analysis and RIB of the toy experiment."""

    digits: tuple[int, int] = (2, 8)                      # paper 3.1: '2' gets a circle, '8' a square
    shape_fraction: float = Field(0.1, gt=0, lt=1)        # paper 3.1: "only a small subset (10%)"
    canvas: int = Field(56, ge=40)                        # ours: a 28x28 digit and a shape side by side
    shape_size: int = Field(4, ge=3, le=20)               # paper Fig. 1a: ~3-4 px beside a ~20 px digit
    shape_gap: int = Field(2, ge=0)                       # ours: min gap between the ink's box and the shape
    test_fraction: float = Field(0.2, gt=0, lt=1)         # ours: held-out digits for accuracy and analysis
    # Paper 3.1: "five convolutional layers followed by a final fully connected layer"; widths ours.
    channels: tuple[int, int, int, int, int] = (8, 16, 16, 32, 32)
    strides: tuple[int, int, int, int, int] = (1, 2, 1, 2, 1)  # ours: 56 -> 14 before GAP
    epochs: int = Field(15, ge=1)                         # ours: ~1 min on 2 CPU cores, >95% test accuracy
    batch_size: int = Field(32, ge=1)                     # ours
    lr: float = Field(1e-3, gt=0)                         # ours: Adam
    n_analysis: int = Field(100, ge=1)                    # paper Fig. 1c / 2b: averaged over 100 images
    hgr_threshold: float = Field(0.3, gt=0, lt=1)         # paper 3.1: "gradient above 0.3"
    rib_iterations: int = Field(10, ge=2, le=100)         # paper 4.1 K = 10; Fig. 2b plots k = 0..9
    # ours: the toy analogue of 8e-6 (x10 on the FC); x's logit grows steadily over 10 steps, 3e-4 accelerates
    # towards divergence.
    rib_lr: float = Field(1e-4, gt=0)
    # B: x and B - 1 images of the other class (paper 3.2). Paper 4.1 has B = 20; the official batch is x
    # at 3 scales x flip (6 rows) + 20 others, so x is ~1/4 of it, and 1/4 is what B = 4 keeps. With
    # two classes, 19 others all push the one other logit and drag x's own logit down.
    rib_batch: int = Field(4, ge=1)
    rib_weight_decay: float = Field(1e-4, ge=0)           # obtain_RIB_CAM.py: --cam_weight_decay 1e-4
    rib_momentum: float = Field(1e-4, ge=0)               # PolyOptimizer passes weight decay as momentum
    rib_poly_power: float = Field(0.9, gt=0)              # PolyOptimizer's exponent 0.9
    # ours: an HGR change of at most this over the RIB run counts as "flat", more as a rise.
    flat_tolerance: float = Field(0.05, gt=0, lt=1)
    # ours: torch intra-op threads during the run. The net is too small to gain from more; on a busy
    # 2-core machine a second thread made training 10-20x slower.
    threads: int = Field(1, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _fits(self) -> ToyConfig:
        if self.digits[0] == self.digits[1]:
            raise ValueError("the two digits must differ")
        if self.canvas < MNIST_SIDE + self.shape_size + self.shape_gap:
            raise ValueError(f"canvas {self.canvas} cannot hold a digit and a shape of {self.shape_size}px apart")
        return self


@dataclass
class ToyData:
    images: np.ndarray   # [N, S, S] float32 in [0, 1]
    labels: np.ndarray   # [N] int64: index into ToyConfig.digits
    regions: np.ndarray  # [N, S, S] uint8: D, ND or BG
    shaped: np.ndarray   # [N] bool: the image has a shape

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.images)[:, None], torch.from_numpy(self.labels)


def shape_glyph(label: int, size: int) -> np.ndarray:
    """Filled circle for the first digit's class, filled square for the second (paper Fig. 1a)."""
    if label == 1:
        return np.ones((size, size), bool)
    c = (size - 1) / 2
    yy, xx = np.mgrid[:size, :size]
    return (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2) ** 2


def render(digit: np.ndarray, label: int, with_shape: bool, cfg: ToyConfig,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One canvas and its region map: the digit anywhere, the shape anywhere clear of its ink.

    R_D is every pixel with ink (> 0), R_ND the shape's pixels and R_BG the rest of the canvas.
    """
    s = cfg.canvas
    image = np.zeros((s, s), np.float32)
    regions = np.full((s, s), BG, np.uint8)
    top, left = (int(v) for v in rng.integers(0, s - MNIST_SIDE + 1, 2))
    ink = digit > 0
    image[top:top + MNIST_SIDE, left:left + MNIST_SIDE] = digit / 255.0
    regions[top:top + MNIST_SIDE, left:left + MNIST_SIDE][ink] = D
    if with_shape:
        glyph = shape_glyph(label, cfg.shape_size)
        # Every top-left corner whose box stays cfg.shape_gap away from the ink's bounding box.
        rows, cols = np.nonzero(ink)
        y0, y1 = top + rows.min() - cfg.shape_gap, top + rows.max() + cfg.shape_gap
        x0, x1 = left + cols.min() - cfg.shape_gap, left + cols.max() + cfg.shape_gap
        corners = np.arange(s - cfg.shape_size + 1)
        ty, tx = np.meshgrid(corners, corners, indexing="ij")
        clear = (ty + cfg.shape_size <= y0) | (ty > y1) | (tx + cfg.shape_size <= x0) | (tx > x1)
        options = np.argwhere(clear)
        ty0, tx0 = options[rng.integers(len(options))]
        box = (slice(ty0, ty0 + cfg.shape_size), slice(tx0, tx0 + cfg.shape_size))
        image[box][glyph] = 1.0
        regions[box][glyph] = ND
    return image, regions


def make_toy_data(cfg: ToyConfig) -> tuple[ToyData, ToyData, ToyData]:
    """Train and test sets (``shape_fraction`` with a shape) and the analysis set (all with a shape).

    The analysis images are held-out digits, each drawn with a shape, so the gradients show what
    the classifier learned rather than what it memorised.
    """
    rng = np.random.default_rng(cfg.seed)
    images, labels = _mnist()
    idx = rng.permutation(np.flatnonzero(np.isin(labels, cfg.digits)))
    n_test = round(len(idx) * cfg.test_fraction)
    if cfg.n_analysis > n_test:
        raise ValueError(f"n_analysis {cfg.n_analysis} exceeds the {n_test} held-out digits")
    classes = (labels == cfg.digits[1]).astype(np.int64)

    def build(ids: np.ndarray, shaped: np.ndarray) -> ToyData:
        drawn = [render(images[i], int(classes[i]), bool(w), cfg, rng) for i, w in zip(ids, shaped, strict=True)]
        return ToyData(np.stack([d[0] for d in drawn]), classes[ids], np.stack([d[1] for d in drawn]), shaped)

    def subset(ids: np.ndarray) -> np.ndarray:
        shaped = np.zeros(len(ids), bool)
        shaped[rng.choice(len(ids), round(len(ids) * cfg.shape_fraction), replace=False)] = True
        return shaped

    test_ids, train_ids = idx[:n_test], idx[n_test:]
    analysis_ids = test_ids[: cfg.n_analysis]
    return (build(train_ids, subset(train_ids)), build(test_ids, subset(test_ids)),
            build(analysis_ids, np.ones(len(analysis_ids), bool)))
