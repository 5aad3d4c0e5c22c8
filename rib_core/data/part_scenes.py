"""Part scenes: MNIST objects whose class evidence sits in a part while the mask covers the whole.

The paper's premise (sections 1 and 3.1) is that a classifier's CAM covers the most discriminative
part of an object and misses the rest, which still carries some class information, and that RIB
recovers that rest. On the demo's scenes a digit is discriminative almost everywhere, so CAM already
covers it (issue 24). Here each object is a digit "head" (drawn as in the demo) on a "body": an
ellipse several times the head's box in area, touching it, filled with one of a few styles (a
colour and a stripe texture). Each class has a preferred style, which its body wears with
probability ``body_style_p``; otherwise the style is drawn uniformly from all, so a body is only
weakly class-specific. The ground-truth mask is the head's strokes + the body; ``parts/<id>.png``
records which pixel is in a head's square (1), in a body (2) or neither (0), and ``objects/<id>.png``
each object's label over its square and body, so that a map's mass can be split between the parts
(a stride-16 map cannot follow strokes, so a head's mass is counted over its square).

Pretraining on single digits (:func:`rib_core.experiments.demo_job.digit_pretraining`) reads only the
demo's fields of a :class:`PartSceneConfig`, so it draws plain digits, the heads' stand-in for
ImageNet weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

from rib_core.data.demo_data import (
    DemoDataConfig,
    DemoDataset,
    Scene,
    digit_colour,
    draw_background,
    glyph_of,
    make_demo_dataset,
    paste,
    write_scenes,
)
from rib_core.io.localization_map import LocalizationMap

HEAD, BODY = 1, 2  # values of the parts layer
PARTS, OBJECTS = "parts", "objects"  # the layers' folders under the data set's root


class PartSceneConfig(DemoDataConfig):
    """A part-scene recipe: the demo's knobs (``digit_size`` is the head's side) plus the bodies'."""

    body_area: tuple[float, float] = Field((2.0, 3.0), description="a body's area over its head's square box "
                                           "(benchmarks/bench_premise.py: chosen on tuning seeds)")
    body_aspect: tuple[float, float] = Field((0.7, 1.4), description="a body's height over its width")
    body_style_p: float = Field(0.4, ge=0, le=1, description="probability that a body wears its class's preferred "
                                                             "style; otherwise one of all styles, uniformly")
    body_styles: int = Field(10, ge=1, le=10, description="how many body styles there are")
    # How far a body reaches into its head's box (share of the side): MNIST digits leave a 4 px margin
    # in 28, so 0.3 makes the body touch the strokes.
    body_overlap: float = Field(0.3, ge=0, lt=1)


# The premise benchmark's recipe (benchmarks/bench_premise.py), chosen on tuning seeds (scenes 100,
# classifier 101; docs/results/bench_premise_tuning.json): heads of 24-34 px on 1,000 scenes left the
# classifier at 73% mAP; 28-40 px on 1,500 reached 91%, but with bodies of 1.2-2.0 head squares CAM's
# recall stayed at the demo's (70%); at 2.0-3.0 it fell to 52%.
PREMISE_SCENES = PartSceneConfig(n_train=1500, n_val=100, canvas=112, digit_size=(28, 40), max_per_image=2)


def style_colour(style: int, styles: int) -> np.ndarray:
    """Style ``style``'s body colour: hues around the wheel at mid brightness (70-170), below the
    digits' 140-255 and above the backgrounds' 10-60."""
    hue = 2 * np.pi * style / styles
    return 120 + 50 * np.cos(hue - np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]))


def _body(rng: np.random.Generator, cfg: PartSceneConfig, cls: int, h: int, w: int) -> np.ndarray:
    """An h x w patch of a class ``cls`` body's fill: its style's colour with its style's stripes."""
    style = cfg.digits.index(cls) % cfg.body_styles
    if rng.random() >= cfg.body_style_p:
        style = int(rng.integers(cfg.body_styles))
    angle = np.pi * style / cfg.body_styles
    period = 6 + 2 * (style % 3)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    stripes = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + rng.uniform(0, 6.3))
    colour = style_colour(style, cfg.body_styles) * rng.uniform(0.85, 1.15)
    return colour + 25 * stripes[..., None] + rng.normal(0, 6, (h, w, 3))


def _object(rng: np.random.Generator, cfg: PartSceneConfig, side: int) -> tuple[np.ndarray, int, int, int, int]:
    """Where a body goes around a head of ``side`` px at (0, 0): the body's boolean mask in the
    object's box, the object's box size (h, w) and the head's offset (top, left) in it."""
    area = rng.uniform(*cfg.body_area) * side * side
    aspect = rng.uniform(*cfg.body_aspect)
    rx = np.sqrt(area / (np.pi * aspect))
    ry = aspect * rx
    reach = cfg.body_overlap * side
    direction = int(rng.integers(4))  # body below, above, right of, left of the head
    vertical = direction < 2
    # the body's centre relative to the head box's centre
    dy = (side / 2 - reach + ry) * (1 if direction == 0 else -1) if vertical else 0.0
    dx = 0.0 if vertical else (side / 2 - reach + rx) * (1 if direction == 2 else -1)
    top = min(-side / 2, dy - ry)
    left = min(-side / 2, dx - rx)
    h = int(np.ceil(max(side / 2, dy + ry) - top))
    w = int(np.ceil(max(side / 2, dx + rx) - left))
    yy, xx = np.mgrid[:h, :w].astype(np.float32) + 0.5
    body = ((yy + top - dy) / ry) ** 2 + ((xx + left - dx) / rx) ** 2 <= 1
    return body, h, w, int(np.round(-side / 2 - top)), int(np.round(-side / 2 - left))


def part_scene(rng: np.random.Generator, images: np.ndarray, by_class: dict[int, np.ndarray],
               cfg: PartSceneConfig) -> Scene:
    """One canvas of head-on-body objects: its mask (head strokes + body) and two layers, ``parts``
    (the head's square 1, the body 2) and ``objects`` (each object's label over its square and body)."""
    size = cfg.canvas
    canvas = draw_background(rng, cfg)
    mask = np.zeros((size, size), np.uint8)
    parts = np.zeros((size, size), np.uint8)
    objects = np.zeros((size, size), np.uint8)
    occupied = np.zeros((size, size), bool)
    n = int(rng.integers(cfg.min_per_image, cfg.max_per_image + 1))
    classes = rng.choice(cfg.digits, size=min(n, len(cfg.digits)), replace=False)
    placed: list[int] = []
    for cls in (int(c) for c in classes):
        side = int(rng.integers(cfg.digit_size[0], min(cfg.digit_size[1], size) + 1))
        glyph = glyph_of(rng, images, by_class, cls, side)
        for _ in range(30):  # rejection sampling: a body that fits the canvas, in a free spot
            body, h, w, head_top, head_left = _object(rng, cfg, side)
            if h > size or w > size:
                continue
            top, left = (int(v) for v in rng.integers(0, [size - h + 1, size - w + 1]))
            if not occupied[top:top + h, left:left + w].any():
                break
        else:
            continue
        box = np.zeros((h, w), bool)
        box[head_top:head_top + side, head_left:head_left + side] = True
        strokes = np.zeros((h, w), bool)
        strokes[head_top:head_top + side, head_left:head_left + side] = glyph > 0.5
        paste(canvas, body.astype(np.float32), top, left, _body(rng, cfg, cls, h, w))
        paste(canvas, glyph, top + head_top, left + head_left, digit_colour(rng, cfg))
        label = cfg.digits.index(cls) + 1
        window = (slice(top, top + h), slice(left, left + w))
        mask[window][body | strokes] = label
        parts[window][body] = BODY
        parts[window][(box & ~body) | strokes] = HEAD
        objects[window][box | body] = label
        occupied[window] = True
        placed.append(cls)
    return Scene(np.clip(canvas, 0, 255).astype(np.uint8), mask, placed, {PARTS: parts, OBJECTS: objects})


def make_part_scenes(root: str | Path, cfg: PartSceneConfig | None = None) -> DemoDataset:
    """Write part scenes (images, masks, ``parts/`` layers, manifests) under ``root``."""
    cfg = cfg or PartSceneConfig()
    return write_scenes(root, cfg, lambda rng, images, by_class: part_scene(rng, images, by_class, cfg))


def make_scenes(root: str | Path, cfg: DemoDataConfig) -> DemoDataset:
    """The scenes ``cfg`` describes under ``root``: part scenes for a :class:`PartSceneConfig`, the
    demo's otherwise."""
    if isinstance(cfg, PartSceneConfig):
        return make_part_scenes(root, cfg)
    return make_demo_dataset(root, cfg)


def layer_path(mask_path: str | Path, layer: str) -> Path:
    """A layer beside a part scene's mask (``masks/<id>.png`` -> ``<layer>/<id>.png``)."""
    mask_path = Path(mask_path)
    return mask_path.parent.parent / layer / mask_path.name


def part_mass(m: LocalizationMap, parts: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """A map's mass (sum of each labelled class's normalised map) on its own objects' head squares,
    on their bodies, and elsewhere (background and other objects): [3]."""
    out = np.zeros(3)
    for k, values in zip(m.keys, m.high_res, strict=True):
        own = objects == int(k) + 1
        head = values[own & (parts == HEAD)].sum()
        body = values[own & (parts == BODY)].sum()
        out += [head, body, values.sum() - head - body]
    return out


def part_recall(seed: np.ndarray, mask: np.ndarray, parts: np.ndarray) -> np.ndarray:
    """How many head (stroke) and body pixels a seed labels with their own class, and how many
    there are: [head hits, head pixels, body hits, body pixels]."""
    hit = (seed == mask) & (mask > 0)
    head, body = (mask > 0) & (parts == HEAD), (mask > 0) & (parts == BODY)
    return np.array([(hit & head).sum(), head.sum(), (hit & body).sum(), body.sum()], np.int64)
