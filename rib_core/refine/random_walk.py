"""IRN's random walk (``step/make_sem_seg_labels.py``, ``misc/indexing.py``) and its labels.

The stride-4 map, raised to the power 1.3 (RIB's addition), is spread 2^8 times over a transition
matrix built from IRN's boundary map. IRN builds the dense HW x HW matrix and squares it eight
times, which runs large images out of GPU memory. Here the matrix is a band: each pixel has
1 + 2 x 34 neighbours within radius 5, kept as a sparse matrix, and the walk applies it 256 times.
The result is the same (the tests compare both); memory is O(69 HW) instead of O((HW)^2).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rib_core.classifier.cam import LocalizationMap
from rib_core.config.stage_configs import RandomWalkConfig
from rib_core.data.classes import IGNORE_INDEX
from rib_core.refine.irn import IrnNet, PathIndex, boundary_map


def transition_matrix(boundary: torch.Tensor, radius: int, beta: float) -> torch.Tensor:
    """IRN's transition matrix T (``to_transition_matrix``), transposed, as a sparse CSR matrix.

    T[i, j] is affinity(i, j)^beta over pixels i within ``radius`` of j (and j itself, affinity 1),
    each column normalised to sum to one. Row j of the result holds column j of T, so that
    ``T^T @ x`` is one step ``x T`` of IRN's walk. Pixels outside the map have boundary 1, hence
    affinity 0, exactly as IRN's padding makes them. Memory: 1 + 2D values per pixel.
    """
    index = PathIndex(radius)
    h, w = boundary.shape
    padded = F.pad(boundary[None, None], (radius, radius, 0, radius), value=1.0)[0]
    aff = index.affinity(padded)[0, :, :h, 1:w + 1] ** beta  # [D, h, w]: pair (p, p + d) read at p
    back = F.pad(aff, (radius, radius, radius, radius))
    neighbours = {(0, 0): torch.ones_like(boundary)}
    for d, (dy, dx) in enumerate(index.offsets.tolist()):
        neighbours[(dy, dx)] = aff[d]
        neighbours[(-dy, -dx)] = back[d, radius - dy:radius - dy + h, radius - dx:radius - dx + w]  # read at p + d
    # CSR wants each row's columns ascending: column j + dy * w + dx, so sort offsets by dy * w + dx.
    order = sorted(neighbours, key=lambda o: o[0] * w + o[1])
    band = torch.stack([neighbours[o] for o in order]).flatten(1)  # [K, h*w]
    band = band / band.sum(0, keepdim=True)
    dev = boundary.device
    ys, xs = torch.arange(h, device=dev).repeat_interleave(w), torch.arange(w, device=dev).repeat(h)
    dys = torch.tensor([o[0] for o in order], device=dev)[:, None]
    dxs = torch.tensor([o[1] for o in order], device=dev)[:, None]
    inside = (ys + dys >= 0) & (ys + dys < h) & (xs + dxs >= 0) & (xs + dxs < w)  # [K, h*w]
    cols = (ys + dys) * w + xs + dxs
    crow = F.pad(inside.sum(0).cumsum(0), (1, 0))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols.T[inside.T], band.T[inside.T], (h * w, h * w),
                                       check_invariants=False)


def propagate(x: torch.Tensor, transition: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` random-walk steps x <- x T on maps [C, h, w], with T from :func:`transition_matrix`."""
    c, h, w = x.shape
    z = x.reshape(c, h * w).T.contiguous()
    for _ in range(steps):
        z = transition @ z
    return z.T.reshape(c, h, w)


def to_image_size(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Stride-4 maps [C, h, w] at the image's ``size``, as IRN upsamples the walk: bilinear x4, cropped."""
    return F.interpolate(x[None], scale_factor=4, mode="bilinear", align_corners=False)[0, :, :size[0], :size[1]]


def walk_scores_at(lmap: LocalizationMap, boundary: torch.Tensor, cfg: RandomWalkConfig,
                   lengths: Sequence[int]) -> dict[int, np.ndarray]:
    """:func:`walk_scores` after 2^k steps for each k of ``lengths`` (``cfg.exp_times`` is not
    used): one transition matrix, each longer walk continued from the shorter one."""
    size = lmap.high_res.shape[1:]
    cam = torch.from_numpy(lmap.cam).to(boundary.device, torch.float32)
    if len(lmap.keys) == 0:
        return {k: np.zeros((0, *size), np.float32) for k in lengths}
    if cam.shape[-2:] != boundary.shape:
        raise ValueError(f"map is {tuple(cam.shape[-2:])} at stride 4 but the boundary map is {tuple(boundary.shape)}")
    transition = transition_matrix(boundary, cfg.radius, cfg.beta)
    walked, done, out = cam.clamp_min(0) ** cfg.power * (1 - boundary), 0, {}
    for k in sorted(set(lengths)):
        walked, done = propagate(walked, transition, 2 ** k - done), 2 ** k
        up = to_image_size(walked, size)
        peak = up.max()
        out[k] = (up / peak if peak > 0 else torch.zeros_like(up)).cpu().numpy()
    return out


def walk_scores(lmap: LocalizationMap, boundary: torch.Tensor, cfg: RandomWalkConfig | None = None) -> np.ndarray:
    """The random walk's [K, H, W] values for the image's classes (``lmap.keys``), at full size and
    divided by the image's peak, as IRN's ``make_sem_seg_labels`` computes them before thresholding."""
    cfg = cfg or RandomWalkConfig()
    return walk_scores_at(lmap, boundary, cfg, [cfg.exp_times])[cfg.exp_times]


def mask_from_scores(scores_: np.ndarray, keys: Sequence[int], bg_threshold: float) -> np.ndarray:
    """IRN's labels: the best class where its walk value beats the constant background score."""
    if len(keys) == 0:
        return np.zeros(scores_.shape[1:], np.uint8)
    labels = np.concatenate([[0], np.asarray(keys, np.int64) + 1]).astype(np.uint8)
    best = np.concatenate([np.full_like(scores_[:1], bg_threshold), scores_]).argmax(0)
    return labels[best]


def three_way_labels(scores_: np.ndarray, keys: Sequence[int], fg_threshold: float = 0.3,
                     bg_threshold: float = 0.2) -> np.ndarray:
    """Labels for DeepLab's first round of re-training (appendix A.1): where the best walk value is
    above ``fg_threshold`` that class, below ``bg_threshold`` background, 255 (ignore) in between."""
    if scores_.shape[0] != len(keys):
        raise ValueError(f"scores must be [len(keys), H, W] = [{len(keys)}, H, W], got {scores_.shape}")
    if len(keys) == 0:
        return np.zeros(scores_.shape[1:], np.uint8)
    best = scores_.max(0)
    out = np.full(best.shape, IGNORE_INDEX, np.uint8)
    fg = best > fg_threshold
    out[fg] = (np.asarray(keys, np.int64) + 1)[scores_.argmax(0)][fg]
    out[best < bg_threshold] = 0
    return out


def random_walk(lmap: LocalizationMap, boundary: torch.Tensor, cfg: RandomWalkConfig | None = None) -> np.ndarray:
    """Semantic pseudo-mask of one image from its map and IRN boundary map (stride 4): uint8 labels."""
    cfg = cfg or RandomWalkConfig()
    return mask_from_scores(walk_scores(lmap, boundary, cfg), lmap.keys, cfg.bg_threshold)


def irn_mask(model: IrnNet, image_uint8: np.ndarray, lmap: LocalizationMap, cfg: RandomWalkConfig | None = None,
             device: torch.device | str = "cpu") -> np.ndarray:
    """IRN's pseudo-mask of one image: boundary map, then random walk."""
    return random_walk(lmap, boundary_map(model, image_uint8, device), cfg)
