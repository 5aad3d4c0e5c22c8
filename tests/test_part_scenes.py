"""The part scenes (rib_core.data.part_scenes): head + body masks, labels, determinism, the mass split."""

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from rib_core.data import part_scenes as ps
from rib_core.data.datasets import load_mask
from rib_core.data.demo_data import DemoDataConfig, make_demo_dataset
from rib_core.io.localization_map import LocalizationMap

# sha256 of the demo recipe's images and masks (seed 3, 6 + 2 scenes) drawn by the code before part scenes
DEMO_DIGEST = "84452688138871d5de605401e5697ddfada80f081476c9dd5a67920112042c9b"
SMALL = ps.PartSceneConfig(n_train=12, n_val=3, canvas=112, digit_size=(24, 34), max_per_image=2, seed=5)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for folder in ("images", "masks", ps.PARTS, ps.OBJECTS):
        for f in sorted((root / folder).iterdir()):
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_each_object_is_a_head_on_a_larger_body_and_the_mask_covers_both(tmp_path):
    ds = ps.make_part_scenes(tmp_path, SMALL)
    assert len(ds.train.records) == 12 and len(ds.val.records) == 3
    for manifest in (ds.train, ds.val):
        for r in manifest.records:
            mask = load_mask(manifest.mask_uri(r))
            parts, objects = (load_mask(str(ps.layer_path(manifest.mask_uri(r), layer)))
                              for layer in (ps.PARTS, ps.OBJECTS))
            assert ((parts == ps.BODY) <= (mask > 0)).all() and ((mask > 0) <= (parts > 0)).all()
            assert ((objects > 0) == (parts > 0)).all() and (mask[mask > 0] == objects[mask > 0]).all()
            labels = {int(v) for v in np.unique(mask)} - {0}
            assert labels == {manifest.classes.index(c) + 1 for c in r.labels}
            for label in labels:  # each object has both parts, the body several times the head's strokes
                head, body = ((mask == label) & (parts == ps.HEAD)).sum(), ((mask == label) & (parts == ps.BODY)).sum()
                square = ((objects == label) & (parts == ps.HEAD)).sum()
                assert 0 < head < square and body > 3 * head


def test_the_scenes_are_the_same_for_a_seed_and_differ_between_seeds(tmp_path):
    one, two = ps.make_part_scenes(tmp_path / "a", SMALL), ps.make_part_scenes(tmp_path / "b", SMALL)
    other = ps.make_part_scenes(tmp_path / "c", SMALL.model_copy(update={"seed": 6}))
    assert _digest(one.root) == _digest(two.root) != _digest(other.root)
    assert [r.labels for r in one.train.records] == [r.labels for r in two.train.records]


def test_the_bodies_wear_their_class_style_when_p_is_one(tmp_path):
    # p = 1: every body of a class has the same mean colour up to the per-body brightness jitter;
    # p = 0: the styles are drawn at random, so bodies of one class differ more.
    def hue_spread(p: float) -> float:
        ds = ps.make_part_scenes(tmp_path / str(p), SMALL.model_copy(update={"body_style_p": p, "n_train": 30,
                                                                          "max_per_image": 1}))
        by_class: dict[str, list[np.ndarray]] = {}
        for r in ds.train.records:
            image = np.asarray(Image.open(ds.train.image_uri(r)).convert("RGB"), np.float64)
            body = load_mask(str(ps.layer_path(ds.train.mask_uri(r), ps.PARTS))) == ps.BODY
            colour = image[body].mean(0)
            by_class.setdefault(r.labels[0], []).append(colour / colour.sum())
        return float(np.mean([np.std(v, 0).sum() for v in by_class.values() if len(v) > 1]))

    assert hue_spread(1.0) < 0.5 * hue_spread(0.0)


def test_the_demo_recipe_is_unchanged_by_the_part_scenes(tmp_path):
    # make_demo_dataset and ps.make_part_scenes share one writer; the demo's draws must not move: this
    # is the digest of the demo recipe's files before part scenes existed.
    ds = make_demo_dataset(tmp_path, DemoDataConfig(n_train=6, n_val=2, canvas=96, digit_size=(30, 46), seed=3))
    h = hashlib.sha256()
    for folder in ("images", "masks"):
        for f in sorted((ds.root / folder).iterdir()):
            h.update(f.name.encode() + f.read_bytes())
    assert h.hexdigest() == DEMO_DIGEST


def test_the_mass_and_the_recall_split_between_head_and_body():
    mask, parts, objects = (np.zeros((4, 4), np.uint8) for _ in range(3))
    parts[0, :], objects[0, :] = ps.HEAD, 3   # class index 2's head square: row 0 ...
    mask[0, :2] = 3                        # ... whose strokes are 2 px
    mask[1:3, :], parts[1:3, :], objects[1:3, :] = 3, ps.BODY, 3  # its body: 8 px
    values = np.zeros((1, 4, 4), np.float32)
    values[0, 0, :3] = 1.0    # the head's strokes and one pixel of its square
    values[0, 1, :2] = 0.5    # a quarter of the body, at half strength
    values[0, 3, 3] = 1.0     # background
    m = LocalizationMap(np.array([2]), values[:, ::4, ::4], values)
    np.testing.assert_allclose(ps.part_mass(m, parts, objects), [3.0, 1.0, 1.0])
    seed = np.where(values[0] > 0.4, 3, 0).astype(np.uint8)
    assert ps.part_recall(seed, mask, parts).tolist() == [2, 2, 2, 8]
