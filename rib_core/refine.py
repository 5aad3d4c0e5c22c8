"""From localization maps to pseudo-masks: seed + CRF, and IRN (the paper's refinement, section 3.3).

The IRN pipeline as the RIB code runs it (``run_sample.py``):

1. confident labels (``step/cam_to_ir_label.py``): the map's seed at a high threshold (foreground)
   and at a low one (background), each refined by a dense CRF; pixels in between are ignored;
2. IRN trained on them (``step/train_irn.py``, :mod:`rib_core.irn`);
3. random walk (``step/make_sem_seg_labels.py``): the stride-4 map, raised to the power 1.3 (RIB's
   addition), is spread 2^8 times over a transition matrix built from IRN's boundaries.

IRN builds the dense HW x HW transition matrix and squares it eight times, which runs large images
out of GPU memory. Here the matrix is a band: each pixel has 1 + 2 x 34 neighbours within radius 5,
kept as a sparse matrix, and the walk applies it 256 times. The result is the same (the tests
compare both), memory is O(69 HW) instead of O((HW)^2).

Optionally, saliency maps veto pixels where they disagree with the mask (the paper's RIB-Sal).
"""

from __future__ import annotations

import io
import os
import random
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from rib_core import augment
from rib_core.cam import LocalizationMap
from rib_core.checkpoints import FORMAT as CAM_FORMAT
from rib_core.checkpoints import is_official_layout, load_classifier, read_checkpoint
from rib_core.classes import IGNORE_INDEX
from rib_core.crf import CrfConfig, crf_seed
from rib_core.datasets import Manifest, ManifestRecord, load_image, load_manifest, load_mask
from rib_core.evaluation import EvalConfig, confusion, scores, seed_from_map, sweep_seeds, write_report
from rib_core.irn import IrnNet, PathIndex, boundary_map, irn_loss, load_irn, save_irn
from rib_core.optim import PolySGD, irn_param_groups
from rib_core.storage import join_uri, read_bytes, uri_exists
from rib_core.train_classifier import _load_backbone
from rib_core.visualize import label_png, mask_overlay, png_bytes


class ConfidentLabelConfig(BaseModel):
    """Confident foreground / background labels for IRN (``step/cam_to_ir_label.py``)."""

    model_config = ConfigDict(extra="forbid")

    fg_threshold: float = Field(0.35, gt=0, lt=1)  # RIB run_sample.py --conf_fg_thres 0.35 (IRN: 0.30)
    bg_threshold: float = Field(0.17, gt=0, lt=1)  # RIB run_sample.py --conf_bg_thres 0.17 (IRN: 0.05)
    crf: CrfConfig = Field(default_factory=CrfConfig)  # crf_inference_label with its defaults

    @model_validator(mode="after")
    def _ordered(self) -> ConfidentLabelConfig:
        if self.bg_threshold >= self.fg_threshold:
            raise ValueError("bg_threshold must be below fg_threshold")
        return self


class IrnTrainConfig(BaseModel):
    """IRN training; defaults are the RIB/IRN ``run_sample.py`` and ``step/train_irn.py`` ones."""

    model_config = ConfigDict(extra="forbid")

    arch: str = Field("resnet50", description="backbone (IRN: resnet50)")
    # IRN starts from ImageNet weights (resnet50(pretrained=True)). Give a torchvision state dict or
    # a classifier checkpoint (ours or IRN's res50_cam.pth) whose backbone to use; None = random.
    init_weights: str | None = None
    crop_size: int = Field(512, ge=32, multiple_of=16)  # --irn_crop_size 512
    batch_size: int = Field(32, ge=1)                    # --irn_batch_size 32
    epochs: int = Field(3, ge=1)                         # --irn_num_epoches 3
    lr: float = Field(0.1, gt=0)                         # --irn_learning_rate 0.1 (x10 on the displacement head)
    weight_decay: float = Field(1e-4, ge=0)              # --irn_weight_decay 1e-4
    momentum: float = Field(1e-4, ge=0)                  # PolyOptimizer passes weight_decay as momentum (optim.py)
    poly_power: float = Field(0.9, gt=0)                 # PolyOptimizer's exponent
    radius: int = Field(10, ge=2, le=20)                 # train_irn.py PathIndex(radius=10)
    rescale: tuple[float, float] = (0.5, 1.5)            # VOC12AffinityDataset rescale=(0.5, 1.5)
    hflip: bool = True                                   # hor_flip=True
    num_workers: int = Field(0, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _crop_fits_radius(self) -> IrnTrainConfig:
        side = self.crop_size // 4  # the networks' stride-4 map
        if side <= 2 * (self.radius - 1):
            raise ValueError(f"crop_size {self.crop_size} gives a {side}x{side} map, too small for radius "
                             f"{self.radius}: use radius <= {side // 2} or a larger crop")
        return self


class RandomWalkConfig(BaseModel):
    """Random walk on IRN's affinities (``step/make_sem_seg_labels.py``, ``misc/indexing.py``)."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(10.0, gt=0)               # run_sample.py --beta 10
    exp_times: int = Field(8, ge=0, le=12)        # --exp_times 8: 2^8 steps
    radius: int = Field(5, ge=2, le=10)           # propagate_to_edge(radius=5)
    power: float = Field(1.3, gt=0)               # RIB run_sample.py --np_power 1.3 (IRN: 1.0)
    bg_threshold: float = Field(0.27, gt=0, lt=1)  # --sem_seg_bg_thres 0.27
    # DeepLab re-training labels (paper appendix A.1): walk value > 0.3 foreground, < 0.2
    # background, 255 between. Not in the public code (which stops at the masks).
    retrain_fg_threshold: float = Field(0.3, gt=0, lt=1)
    retrain_bg_threshold: float = Field(0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _ordered(self) -> RandomWalkConfig:
        if self.retrain_bg_threshold >= self.retrain_fg_threshold:
            raise ValueError("retrain_bg_threshold must be below retrain_fg_threshold")
        return self


class RefineConfig(BaseModel):
    """Everything from maps to pseudo-masks."""

    model_config = ConfigDict(extra="forbid")

    # Seed threshold for seed + CRF: IRN run_sample.py --cam_eval_thres 0.15. With ground truth,
    # refine_maps uses the best threshold of the seed sweep instead (paper 4.2.1, following SEAM).
    seed_threshold: float = Field(0.15, gt=0, lt=1)
    threshold_from_sweep: bool = True
    crf: CrfConfig = Field(default_factory=CrfConfig)
    labels: ConfidentLabelConfig = Field(default_factory=ConfidentLabelConfig)
    irn: IrnTrainConfig = Field(default_factory=IrnTrainConfig)
    walk: RandomWalkConfig = Field(default_factory=RandomWalkConfig)
    use_irn: bool = True  # paper 3.3: pseudo-masks come from IRN on M; False stops at seed + CRF
    # RIB-Sal (paper 3.3): a saliency value above this (of 255) is foreground. The official code
    # has no saliency step; 0.5 is this project's choice.
    saliency_threshold: float = Field(0.5, gt=0, lt=1)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------- confident labels

def confident_labels(image_uint8: np.ndarray, lmap: LocalizationMap, cfg: ConfidentLabelConfig | None = None,
                     ) -> np.ndarray:
    """IRN's training labels: CRF'd seed at the fg threshold, background only where the CRF'd
    seed at the bg threshold is background too, 255 in between."""
    cfg = cfg or ConfidentLabelConfig()
    fg = crf_seed(image_uint8, lmap, cfg.fg_threshold, cfg.crf)
    bg = crf_seed(image_uint8, lmap, cfg.bg_threshold, cfg.crf)
    out = np.where(fg == 0, IGNORE_INDEX, fg)
    out[(fg == 0) & (bg == 0)] = 0
    return out.astype(np.uint8)


# ----------------------------------------------------------------------------- IRN training

class IrnDataset(Dataset):
    """IRN's ``VOC12AffinityDataset``: random scale, normalise, flip, crop, then pair labels from
    the label map reduced to stride 4."""

    def __init__(self, manifest: Manifest, label_dir: str | os.PathLike[str], cfg: IrnTrainConfig,
                 index: PathIndex) -> None:
        self.manifest = manifest
        self.label_dir = Path(label_dir)
        self.cfg = cfg
        self.index = index
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.manifest[i]
        rng = random.Random(hash((self.cfg.seed, self.epoch, i)))
        img = load_image(self.manifest.image_uri(r))
        label = load_mask(str(self.label_dir / f"{r.id}.png"))
        img, label = augment.random_scale((img, label), self.cfg.rescale, rng)
        x = augment.normalize(img)
        if self.cfg.hflip:
            x, label = augment.random_lr_flip((x, label), rng)
        x, label = augment.crop((x, label), self.cfg.crop_size, (0.0, IGNORE_INDEX), rng)
        bg_pos, fg_pos, neg = self.index.pair_labels(augment.rescale(label, 0.25, nearest=True))
        return {"img": augment.to_chw(x), "bg_pos": torch.from_numpy(bg_pos), "fg_pos": torch.from_numpy(fg_pos),
                "neg": torch.from_numpy(neg)}


def _init_backbone(model: IrnNet, uri: str) -> None:
    """Backbone weights from a classifier checkpoint (ours or IRN's) or a torchvision state dict."""
    obj = read_checkpoint(uri)
    if isinstance(obj, Mapping) and (obj.get("format") == CAM_FORMAT or is_official_layout(obj)):
        classifier, _, _ = load_classifier(uri)
        if classifier.arch != model.arch:
            raise ValueError(f"{uri} has a {classifier.arch} backbone; IRN is configured for {model.arch}")
        model.backbone.load_state_dict(classifier.backbone.state_dict())
    else:
        _load_backbone(model, uri)


@torch.no_grad()
def displacement_mean(model: IrnNet, manifest: Manifest, crop_size: int, device: torch.device | str) -> torch.Tensor:
    """Mean displacement over top-left crops of every image: IRN's MeanShift statistics."""
    model.eval()
    model.dp_mean.zero_()
    means = []
    for r in manifest.records:
        (x,) = augment.crop((augment.normalize(load_image(manifest.image_uri(r))),), crop_size, (0.0,), None)
        _, dp = model(augment.to_chw(x)[None].to(device))
        means.append(dp.mean(dim=(0, 2, 3)).cpu())
    return torch.stack(means).mean(0)


def train_irn(manifest: Manifest, label_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
              cfg: IrnTrainConfig | None = None, device: torch.device | str = "cpu", progress: bool = True,
              ) -> Path:
    """Train IRN on confident labels ``label_dir/<id>.png``; writes and returns ``out_dir/irn.pth``."""
    cfg = cfg or IrnTrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = IrnNet(cfg.arch, cfg.crop_size)
    if cfg.init_weights:
        _init_backbone(model, cfg.init_weights)
    index = PathIndex(cfg.radius)
    dataset = IrnDataset(manifest, label_dir, cfg, index)
    steps_per_epoch = len(dataset) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} images is fewer than one batch of {cfg.batch_size}")
    edge_params, dp_params = model.param_groups()
    optimizer = PolySGD(irn_param_groups(edge_params, dp_params, cfg.lr, cfg.weight_decay),
                        max_step=steps_per_epoch * cfg.epochs, power=cfg.poly_power, momentum=cfg.momentum)
    model.to(device).train()
    history: list[dict[str, float]] = []
    for epoch in range(cfg.epochs):
        dataset.epoch = epoch
        loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                            num_workers=cfg.num_workers,
                            generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        sums: dict[str, float] = {}
        bar = tqdm(loader, desc=f"train irn {epoch + 1}/{cfg.epochs}", disable=not progress, unit="batch")
        for batch in bar:
            edge, dp = model(batch["img"].to(device))
            loss, parts = irn_loss(edge, dp, batch["bg_pos"].to(device), batch["fg_pos"].to(device),
                                   batch["neg"].to(device), index)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            for k, v in {"loss": loss.item(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{loss.item():.4f}")
        history.append({"epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in sums.items()}})
    model.dp_mean.copy_(displacement_mean(model, manifest, cfg.crop_size, device))
    path = out / "irn.pth"
    save_irn(model.cpu(), path, extra={"config": cfg.model_dump(), "history": history, "steps": optimizer.global_step})
    return path


# ----------------------------------------------------------------------------- random walk

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


def walk_scores(lmap: LocalizationMap, boundary: torch.Tensor, cfg: RandomWalkConfig | None = None) -> np.ndarray:
    """The random walk's [K, H, W] values for the image's classes (``lmap.keys``), at full size and
    divided by the image's peak, as IRN's ``make_sem_seg_labels`` computes them before thresholding."""
    cfg = cfg or RandomWalkConfig()
    size = lmap.high_res.shape[1:]
    cam = torch.from_numpy(lmap.cam).to(boundary.device, torch.float32)
    if len(lmap.keys) == 0:
        return np.zeros((0, *size), np.float32)
    if cam.shape[-2:] != boundary.shape:
        raise ValueError(f"map is {tuple(cam.shape[-2:])} at stride 4 but the boundary map is {tuple(boundary.shape)}")
    transition = transition_matrix(boundary, cfg.radius, cfg.beta)
    walked = propagate(cam.clamp_min(0) ** cfg.power * (1 - boundary), transition, 2 ** cfg.exp_times)
    up = F.interpolate(walked[None], scale_factor=4, mode="bilinear", align_corners=False)[0, :, :size[0], :size[1]]
    peak = up.max()
    return (up / peak if peak > 0 else torch.zeros_like(up)).cpu().numpy()


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


# ----------------------------------------------------------------------------- saliency

def decode_saliency(data: bytes) -> np.ndarray:
    """A saliency PNG (any mode) -> uint8 [H, W], 0..255."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L"))


def apply_saliency(mask: np.ndarray, saliency: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Ignore (255) pixels where mask and saliency disagree: fg in the mask but not salient, or
    background in the mask but salient."""
    if saliency.shape != mask.shape:
        raise ValueError(f"saliency map is {saliency.shape} but the mask is {mask.shape}")
    salient = saliency.astype(np.float32) > threshold * 255
    fg = (mask > 0) & (mask != IGNORE_INDEX)
    out = mask.copy()
    out[(fg & ~salient) | ((mask == 0) & salient)] = IGNORE_INDEX
    return out


# ----------------------------------------------------------------------------- per image and per folder

def refine_one(image_uint8: np.ndarray, lmap: LocalizationMap, irn_model: IrnNet | None,
               cfg: RefineConfig | None = None, saliency: np.ndarray | None = None,
               device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """The per-image work of a worker: ``seed``, ``crf`` (seed + CRF), ``irn`` (when a model is
    given) and ``mask``, the final pseudo-mask (IRN's, else the CRF's; saliency applied if given)."""
    cfg = cfg or RefineConfig()
    out = {"seed": seed_from_map(lmap, cfg.seed_threshold),
           "crf": crf_seed(image_uint8, lmap, cfg.seed_threshold, cfg.crf)}
    if irn_model is not None:
        out["irn"] = irn_mask(irn_model, image_uint8, lmap, cfg.walk, device)
    mask = out.get("irn", out["crf"])
    out["mask"] = mask if saliency is None else apply_saliency(mask, saliency, cfg.saliency_threshold)
    return out


class _Scorer:
    """Confusion over a set; predicted 255 (ignored pixels of a pseudo-mask) is left out and counted."""

    def __init__(self, n_classes: int, classes: list[str]) -> None:
        self.conf = np.zeros((n_classes + 1,) * 2, np.int64)
        self.classes = classes
        self.images = 0
        self.ignored = 0
        self.total = 0

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        ignored = pred == IGNORE_INDEX
        valid_gt = gt != IGNORE_INDEX
        self.images += 1
        self.ignored += int((ignored & valid_gt).sum())
        self.total += int(valid_gt.sum())
        self.conf += confusion(np.where(ignored, 0, pred), np.where(ignored, IGNORE_INDEX, gt), len(self.conf))

    def report(self) -> dict[str, Any]:
        return {"images": self.images, **scores(self.conf, self.classes),
                "ignored_fraction": self.ignored / max(self.total, 1)}


def refine_maps(maps_dir: str | os.PathLike[str], manifest: Manifest | str | os.PathLike[str],
                out_dir: str | os.PathLike[str], cfg: RefineConfig | None = None,
                irn_checkpoint: str | None = None, saliency_dir: str | None = None,
                device: torch.device | str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Maps folder (``<id>.npz``) + manifest -> pseudo-masks, overlays and a report.

    Writes under ``out_dir``: ``crf/<id>.png`` (seed + CRF), ``ir_labels/<id>.png`` and ``irn.pth``
    (when IRN is trained here), ``masks/<id>.png`` (final pseudo-masks, VOC palette, 255 ignore),
    ``overlays/<id>.png`` and ``report.json``. IRN is trained on the confident labels of every
    image unless ``irn_checkpoint`` (path or s3:// URI) is given. Images with ground truth are
    scored: seeds (threshold sweep), seeds + CRF, confident labels and masks.
    """
    cfg = cfg or RefineConfig()
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    maps, out = Path(maps_dir), Path(out_dir)
    records = [r for r in manifest.records if (maps / f"{r.id}.npz").exists()]
    missing = [r.id for r in manifest.records if not (maps / f"{r.id}.npz").exists()]
    if not records:
        raise FileNotFoundError(f"no map <id>.npz in {maps} for any of the {len(manifest)} images of the manifest")
    saliency_uri = {} if saliency_dir is None else {r.id: join_uri(saliency_dir, f"{r.id}.png") for r in records}
    absent = [u for u in saliency_uri.values() if not uri_exists(u)]
    if absent:
        raise FileNotFoundError(f"{len(absent)} saliency map(s) missing, e.g. {absent[:3]}")
    for sub in ("crf", "masks", "overlays"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    classes = list(manifest.classes)
    gts = {r.id: manifest.mask_uri(r) for r in records if r.mask is not None}
    timing: dict[str, float] = {}
    report: dict[str, Any] = {"images": len(records), "missing_maps": len(missing), "missing_ids": missing[:20],
                              "evaluated_images": len(gts)}

    def lmap_of(image_id: str) -> LocalizationMap:
        return LocalizationMap.load(maps / f"{image_id}.npz")

    started = time.perf_counter()
    threshold = cfg.seed_threshold
    if gts:
        report["seeds"] = sweep_seeds(((lmap_of(i), load_mask(u)) for i, u in gts.items()), len(classes),
                                      cfg.evaluation, classes)
        if cfg.threshold_from_sweep:
            threshold = report["seeds"]["best_threshold"]
    report["seed_threshold"] = threshold
    train_here = cfg.use_irn and irn_checkpoint is None
    label_dir = out / "ir_labels"
    if train_here:
        label_dir.mkdir(exist_ok=True)
    crf_score, label_score = _Scorer(len(classes), classes), _Scorer(len(classes), classes)
    for r in tqdm(records, desc="crf", disable=not progress, unit="img"):
        image, lmap = load_image(manifest.image_uri(r)), lmap_of(r.id)
        crf = crf_seed(image, lmap, threshold, cfg.crf)
        (out / "crf" / f"{r.id}.png").write_bytes(label_png(crf))
        ir = confident_labels(image, lmap, cfg.labels) if train_here else None
        if ir is not None:
            (label_dir / f"{r.id}.png").write_bytes(label_png(ir))
        if r.id in gts:
            gt = load_mask(gts[r.id])
            crf_score.add(crf, gt)
            if ir is not None:
                label_score.add(ir, gt)
    timing["crf_and_labels_s"] = time.perf_counter() - started
    if gts:
        report["seeds_crf"] = crf_score.report()
        if train_here:
            report["ir_labels"] = label_score.report()

    model: IrnNet | None = None
    if cfg.use_irn:
        started = time.perf_counter()
        if train_here:
            irn_checkpoint = str(train_irn(manifest.subset([r.id for r in records]), label_dir, out, cfg.irn,
                                           device, progress))
        model, _ = load_irn(irn_checkpoint)
        model.to(device)
        report["irn_checkpoint"] = irn_checkpoint
        timing["irn_train_s" if train_here else "irn_load_s"] = time.perf_counter() - started

    started = time.perf_counter()
    mask_score = _Scorer(len(classes), classes)
    raw_score = _Scorer(len(classes), classes)
    if model is not None:
        (out / "retrain_labels").mkdir(exist_ok=True)
    for r in tqdm(records, desc="masks", disable=not progress, unit="img"):
        image, lmap = load_image(manifest.image_uri(r)), lmap_of(r.id)
        if model is not None:
            walked = walk_scores(lmap, boundary_map(model, image, device), cfg.walk)
            mask = mask_from_scores(walked, lmap.keys, cfg.walk.bg_threshold)
            three_way = three_way_labels(walked, lmap.keys, cfg.walk.retrain_fg_threshold,
                                         cfg.walk.retrain_bg_threshold)
            (out / "retrain_labels" / f"{r.id}.png").write_bytes(label_png(three_way))
        else:
            mask = np.asarray(Image.open(out / "crf" / f"{r.id}.png"))
        raw = mask
        if saliency_uri:
            mask = apply_saliency(mask, decode_saliency(read_bytes(saliency_uri[r.id])), cfg.saliency_threshold)
        (out / "masks" / f"{r.id}.png").write_bytes(label_png(mask))
        (out / "overlays" / f"{r.id}.png").write_bytes(png_bytes(mask_overlay(image, mask)))
        if r.id in gts:
            gt = load_mask(gts[r.id])
            mask_score.add(mask, gt)
            raw_score.add(raw, gt)
    timing["masks_s"] = time.perf_counter() - started
    if gts:
        report["masks"] = mask_score.report()
        if saliency_uri:
            report["masks_without_saliency"] = raw_score.report()
    report["manifests"] = {"pseudo_masks": str(_mask_manifest(manifest, records, out, "masks"))}
    if model is not None:
        report["manifests"]["retrain_labels"] = str(_mask_manifest(manifest, records, out, "retrain_labels"))
    report["timing"] = {k: round(v, 2) for k, v in timing.items()}
    report["config"] = cfg.model_dump()
    write_report(report, out / "report.json")
    return report


def _mask_manifest(manifest: Manifest, records: list[ManifestRecord], out: Path, folder: str) -> Path:
    """``<folder>.jsonl``: the images with ``out/<folder>/<id>.png`` as their masks, for DeepLab."""
    path = out / f"{folder}.jsonl"
    Manifest(manifest.classes, [replace(r, image=manifest.image_uri(r), mask=f"{folder}/{r.id}.png") for r in records],
             str(out)).save(path)
    return path
