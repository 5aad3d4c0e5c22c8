"""Dense CRF on localization maps with ``pydensecrf`` (Krähenbühl and Koltun's fully connected CRF).

Two ways to build the unary term:

* ``"labels"``: IRN's ``crf_inference_label`` (``misc/imutils.py``, which RIB ships unchanged). The
  seed's hard labels become a unary that trusts each label with ``gt_prob`` 0.7 and spreads the rest
  over the other labels. This is the only CRF the RIB code runs (``step/cam_to_ir_label.py``, for
  the confident labels that train IRN), so it is the default for "seed + CRF" too.
* ``"probabilities"``: the map's scores with a background score equal to the seed threshold,
  normalised per pixel to sum to one, as a softmax unary (PSA's ``crf_inference``, ``tool/imutils.py``;
  SEAM uses the same). Its classic pairwise settings are in :data:`PSA_PROBABILITY_CRF`.

The label unary also refines a finished mask (:func:`crf_mask`): the random walk's, where
``walk.crf`` asks for it. Labels follow the project's convention: 0 background, class index i -> i + 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels, unary_from_softmax

from rib_core.classifier.cam import LocalizationMap
from rib_core.config.stage_configs import CrfConfig
from rib_core.data.evaluation import seed_from_map

# PSA's crf_inference (jiwoon-ahn/psa tool/imutils.py): softmax unary, bilateral sxy 80 / srgb 13.
PSA_PROBABILITY_CRF = CrfConfig(unary="probabilities", bilateral_sxy=80.0, bilateral_srgb=13.0)


def dense_crf(image: np.ndarray, unary: np.ndarray, cfg: CrfConfig) -> np.ndarray:
    """Mean-field inference: ``unary`` [n, H*W] energies -> marginals [n, H, W]."""
    h, w = image.shape[:2]
    n = unary.shape[0]
    d = dcrf.DenseCRF2D(w, h, n)
    d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    d.addPairwiseGaussian(sxy=cfg.gaussian_sxy, compat=cfg.gaussian_compat)
    d.addPairwiseBilateral(sxy=cfg.bilateral_sxy, srgb=cfg.bilateral_srgb,
                           rgbim=np.array(image, np.uint8, order="C"), compat=cfg.bilateral_compat)
    return np.asarray(d.inference(cfg.iterations), np.float32).reshape(n, h, w)


def crf_labels(image: np.ndarray, labels: np.ndarray, n_labels: int, cfg: CrfConfig) -> np.ndarray:
    """IRN's ``crf_inference_label``: hard labels 0..n_labels-1 in, refined labels out."""
    if n_labels < 2:
        return np.zeros(labels.shape, np.int64)
    unary = unary_from_labels(labels.astype(np.int64), n_labels, gt_prob=cfg.gt_prob, zero_unsure=False)
    return dense_crf(image, unary, cfg).argmax(0)


def crf_probabilities(image: np.ndarray, scores: np.ndarray, cfg: CrfConfig) -> np.ndarray:
    """Scores [n, H, W] (>= 0, not necessarily normalised) -> refined labels 0..n-1."""
    if scores.shape[0] < 2:
        return np.zeros(scores.shape[1:], np.int64)
    probs = np.clip(scores, 0.0, None)
    probs = probs / np.maximum(probs.sum(0, keepdims=True), 1e-5)
    return dense_crf(image, unary_from_softmax(probs), cfg).argmax(0)


def crf_mask(image_uint8: np.ndarray, mask: np.ndarray, keys: Sequence[int], cfg: CrfConfig | None = None,
             ) -> np.ndarray:
    """A uint8 label map (0 background, class i -> i + 1, over the image's classes ``keys``) refined
    by a dense CRF on the image with IRN's label unary (:func:`crf_labels`): uint8 label map."""
    cfg = cfg or CrfConfig()
    keys_ = np.asarray(keys, np.int64)
    if len(keys_) == 0:
        return np.zeros(image_uint8.shape[:2], np.uint8)
    to_compact = np.zeros(256, np.int64)
    to_compact[keys_ + 1] = np.arange(1, len(keys_) + 1)  # label i + 1 -> its row in the map
    refined = crf_labels(image_uint8, to_compact[mask], len(keys_) + 1, cfg)
    return np.concatenate([[0], keys_ + 1]).astype(np.uint8)[refined]


def crf_seed(image_uint8: np.ndarray, lmap: LocalizationMap, threshold: float,
             cfg: CrfConfig | None = None) -> np.ndarray:
    """The seed of ``lmap`` at ``threshold`` refined by a dense CRF on the image: uint8 label map.

    The seed is IRN's: a background channel of value ``threshold`` next to the class maps, argmax.
    Both variants only move labels among background and the image's own classes.
    """
    cfg = cfg or CrfConfig()
    if image_uint8.shape[:2] != lmap.high_res.shape[1:]:
        raise ValueError(f"image is {image_uint8.shape[:2]} but the map is {lmap.high_res.shape[1:]}")
    keys = np.asarray(lmap.keys, np.int64)
    if len(keys) == 0:
        return np.zeros(image_uint8.shape[:2], np.uint8)
    if cfg.unary == "labels":
        return crf_mask(image_uint8, seed_from_map(lmap, threshold), keys, cfg)
    bg = np.full((1, *lmap.high_res.shape[1:]), threshold, np.float32)
    refined = crf_probabilities(image_uint8, np.concatenate([bg, lmap.high_res]), cfg)
    return np.concatenate([[0], keys + 1]).astype(np.uint8)[refined]
