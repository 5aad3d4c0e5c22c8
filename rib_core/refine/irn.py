"""The inter-pixel relation network (IRN, Ahn et al. CVPR 2019), the refinement RIB builds on.

A frozen ResNet feeds two heads (IRN ``net/resnet50_irn.py``): a class-boundary map B at stride 4
and a displacement field D. Pairs of pixels within a radius are related through the boundary: their
affinity is 1 - max(B) over the pixels on the segment that joins them (IRN ``misc/indexing.py``).
Training pulls affinities of same-label pairs to 1 and of different-label pairs to 0; the
random walk (``rib_core.refine.random_walk``) then spreads a map along high affinities.

:class:`PathIndex` is the set of pixel pairs and their segments, written as offsets, so one index
serves any map size (IRN's flat index tables are tied to one size and grow with it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rib_core.data.classes import IGNORE_INDEX
from rib_core.training.augment import normalize, strided_size, to_chw
from rib_core.training.checkpoints import CheckpointError, read_checkpoint, save_atomically
from rib_core.training.networks import build_resnet

FORMAT = "rib-irn"
FORMAT_VERSION = 1
EPS = 1e-5  # IRN's epsilon inside the logs and the loss denominators (net/resnet50_irn.py, step/train_irn.py)


def search_offsets(radius: int) -> list[tuple[int, int]]:
    """Offsets (dy, dx) to the partners of a pixel: one of each symmetric pair, |offset| < radius.

    IRN's ``get_search_paths_dst``: dy = 0 with dx > 0, then dy > 0 with any dx.
    """
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius)
                if dx * dx + dy * dy < radius * radius]
    return offsets


def segment(dy: int, dx: int) -> list[tuple[int, int]]:
    """Pixels between (0, 0) and (dy, dx): those of the bounding box within 1 px of the line."""
    length_sq = dy * dy + dx * dx
    return [(y, x) for y in range(min(0, dy), max(0, dy) + 1) for x in range(min(0, dx), max(0, dx) + 1)
            if (dy * x - dx * y) ** 2 < length_sq]


class PathIndex:
    """Pixel pairs within ``radius`` and the segments between them, as offsets.

    Sources are the pixels of a map of size (h, w) that have every partner inside it: rows
    ``[0, h - r + 1)`` and columns ``[r - 1, w - r + 1)`` with r = ``radius`` (IRN's ``radius_floor``
    is r - 1). Pad a map by r on the left, right and bottom to make every real pixel a source.
    Everything is computed by shifting whole maps, one offset at a time: memory stays linear in the
    map size, with no per-pixel index tables. Offsets are in IRN's order (by segment length).
    """

    def __init__(self, radius: int) -> None:
        if radius < 2:
            raise ValueError("the radius must be at least 2")
        self.radius = radius
        self.floor = radius - 1
        offsets = sorted(search_offsets(radius), key=lambda o: len(segment(*o)))  # stable: IRN's grouping
        self.offsets = np.asarray(offsets, np.int64)  # [D, 2]
        self.paths = [segment(*o) for o in offsets]

    def __len__(self) -> int:
        return len(self.offsets)

    def source_shape(self, size: tuple[int, int]) -> tuple[int, int]:
        h, w = size
        if h <= self.floor or w <= 2 * self.floor:
            raise ValueError(f"a {h}x{w} map is too small for radius {self.radius}")
        return h - self.floor, w - 2 * self.floor

    def shifted(self, x: Any, dy: int, dx: int) -> Any:
        """``x[..., s + (dy, dx)]`` for every source s: a [..., hs, ws] view of a tensor or array."""
        hs, ws = self.source_shape(x.shape[-2:])
        return x[..., dy:dy + hs, self.floor + dx:self.floor + dx + ws]

    def affinity(self, boundary: torch.Tensor) -> torch.Tensor:
        """[B, h, w] boundary probabilities -> [B, D, hs, ws] affinities, 1 - max over each segment."""
        return torch.stack([1 - torch.stack([self.shifted(boundary, y, x) for y, x in path]).amax(0)
                            for path in self.paths], dim=1)

    def pair_labels(self, label: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """IRN's ``GetAffinityLabelFromIndices``: [D, hs, ws] masks of bg-bg pairs, fg-fg pairs of
        one class, and pairs of different labels, among pairs where neither label is ignore (255)."""
        a = self.shifted(label, 0, 0)[None]
        b = np.stack([self.shifted(label, dy, dx) for dy, dx in self.offsets.tolist()])
        valid = (a != IGNORE_INDEX) & (b != IGNORE_INDEX)
        same = (a == b) & valid
        return same & (a == 0), same & (a > 0), (a != b) & valid

    def pair_displacement(self, dp: torch.Tensor) -> torch.Tensor:
        """[B, 2, h, w] displacements -> [B, 2, D, hs, ws]: source minus partner."""
        src = self.shifted(dp, 0, 0)
        return torch.stack([src - self.shifted(dp, dy, dx) for dy, dx in self.offsets.tolist()], dim=2)


def _branch(c_in: int, c_out: int, groups: int, up: int = 1) -> nn.Sequential:
    """1x1 conv, group norm, optional bilinear upsampling, ReLU: IRN's head blocks."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 1, bias=False), nn.GroupNorm(groups, c_out)]
    if up > 1:
        layers.append(nn.Upsample(scale_factor=up, mode="bilinear", align_corners=False))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def stage_channels(arch: str) -> tuple[int, ...]:
    """Channels of conv1 and layers 1-4, the five feature maps IRN taps."""
    return (64, 64, 128, 256, 512) if arch in ("resnet18", "resnet34") else (64, 256, 512, 1024, 2048)


class IrnNet(nn.Module):
    """Boundary and displacement branches on a frozen ResNet (IRN ``net/resnet50_irn.py``).

    Head widths are IRN's for any backbone. ``dp_mean`` is IRN's ``MeanShift``: subtracted from the
    displacement in eval mode, set after training. ``crop_size`` is the training crop, which
    inference pads small images up to, as IRN's ``EdgeDisplacement`` does.
    """

    def __init__(self, arch: str = "resnet50", crop_size: int = 512) -> None:
        super().__init__()
        self.arch = arch
        self.crop_size = crop_size
        self.backbone = build_resnet(arch)
        for p in self.backbone.parameters():
            p.requires_grad_(False)  # IRN detaches every stage: only the heads learn
        c1, c2, c3, c4, c5 = stage_channels(arch)
        self.edge_layers = nn.ModuleList([
            _branch(c1, 32, 4), _branch(c2, 32, 4), _branch(c3, 32, 4, up=2), _branch(c4, 32, 4, up=4),
            _branch(c5, 32, 4, up=4), nn.Conv2d(160, 1, 1, bias=True)])
        self.dp_layers = nn.ModuleList([
            _branch(c1, 64, 8), _branch(c2, 128, 16), _branch(c3, 256, 16), _branch(c4, 256, 16, up=2),
            _branch(c5, 256, 16, up=2), _branch(768, 256, 16, up=2),
            nn.Sequential(_branch(448, 256, 16), nn.Conv2d(256, 2, 1, bias=False))])
        self.register_buffer("dp_mean", torch.zeros(2))

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        b = self.backbone
        x1 = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x2 = b.layer1(x1)
        x3 = b.layer2(x2)
        x4 = b.layer3(x3)
        return [x1, x2, x3, x4, b.layer4(x4)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Boundary logits [B, 1, h, w] and displacements [B, 2, h, w], both at stride 4."""
        x1, x2, x3, x4, x5 = self.features(x)
        e = self.edge_layers
        e1, e2 = e[0](x1), e[1](x2)
        h, w = e2.shape[-2:]
        edge = e[5](torch.cat([e1, e2, e[2](x3)[..., :h, :w], e[3](x4)[..., :h, :w], e[4](x5)[..., :h, :w]], 1))
        d = self.dp_layers
        d1, d2, d3 = d[0](x1), d[1](x2), d[2](x3)
        h3, w3 = d3.shape[-2:]
        up = d[5](torch.cat([d3, d[3](x4)[..., :h3, :w3], d[4](x5)[..., :h3, :w3]], 1))[..., :h, :w]
        dp = d[6](torch.cat([d1, d2, up], 1))
        if not self.training:
            dp = dp - self.dp_mean.view(1, 2, 1, 1)
        return edge, dp

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(boundary head, displacement head): IRN trains the second at 10x the learning rate."""
        return list(self.edge_layers.parameters()), list(self.dp_layers.parameters())


def irn_loss(edge_logits: torch.Tensor, dp: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor,
             neg: torch.Tensor, index: PathIndex) -> tuple[torch.Tensor, dict[str, float]]:
    """IRN's training loss (``AffinityDisplacementLoss`` and ``step/train_irn.py``).

    Affinity: -log(a) on bg-bg and fg-fg pairs (each class-balanced half), -log(1 - a) on pairs of
    different labels. Displacement: for fg-fg pairs the difference of displacements should equal
    the pair's offset, for bg-bg pairs zero. ``bg_pos``, ``fg_pos``, ``neg`` are [B, D, hs, ws].
    """
    aff = index.affinity(torch.sigmoid(edge_logits[:, 0]))
    bg_pos, fg_pos, neg = bg_pos.to(aff.dtype), fg_pos.to(aff.dtype), neg.to(aff.dtype)
    pos_term = -torch.log(aff + EPS)
    neg_term = -torch.log(1.0 + EPS - aff)
    bg_aff = (bg_pos * pos_term).sum() / (bg_pos.sum() + EPS)
    fg_aff = (fg_pos * pos_term).sum() / (fg_pos.sum() + EPS)
    neg_aff = (neg * neg_term).sum() / (neg.sum() + EPS)
    pair = index.pair_displacement(dp)
    target = torch.as_tensor(index.offsets.T, dtype=dp.dtype, device=dp.device)[None, :, :, None, None]
    dp_fg = ((pair - target).abs() * fg_pos[:, None]).sum() / (2 * fg_pos.sum() + EPS)
    dp_bg = (pair.abs() * bg_pos[:, None]).sum() / (2 * bg_pos.sum() + EPS)
    total = (bg_aff / 2 + fg_aff / 2 + neg_aff) / 2 + (dp_fg + dp_bg) / 2
    parts = {"bg_aff": bg_aff.item(), "fg_aff": fg_aff.item(), "neg_aff": neg_aff.item(),
             "dp_fg": dp_fg.item(), "dp_bg": dp_bg.item()}
    return total, parts


@torch.no_grad()
def boundary_map(model: IrnNet, image_uint8: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """Class-boundary probabilities [ceil(H/4), ceil(W/4)] of one image (IRN ``EdgeDisplacement``).

    The image and its mirror are padded at the bottom and right to at least the training crop,
    and the two logit maps are averaged before the sigmoid.
    """
    h, w = image_uint8.shape[:2]
    x = to_chw(normalize(image_uint8))
    x = F.pad(torch.stack([x, x.flip(-1)]), (0, max(model.crop_size, w) - w, 0, max(model.crop_size, h) - h))
    model.eval()
    edge, _ = model(x.to(device))
    hs, ws = strided_size((h, w), 4)
    edge = edge[:, 0, :hs, :ws]
    return torch.sigmoid(edge[0] / 2 + edge[1].flip(-1) / 2)


def save_irn(model: IrnNet, path: str | os.PathLike[str], extra: Mapping[str, Any] | None = None) -> None:
    """Write ``model`` in our format, atomically."""
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "arch": model.arch, "crop_size": model.crop_size,
               "state_dict": model.state_dict(), "extra": dict(extra or {})}
    save_atomically(payload, path)


def load_irn(uri: str | os.PathLike[str]) -> tuple[IrnNet, dict[str, Any]]:
    """An IRN checkpoint in our format from a path or s3:// URI -> (model in eval mode, extra)."""
    obj = read_checkpoint(uri)
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{uri} is not a {FORMAT} checkpoint")
    if obj.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{uri} has IRN checkpoint version {obj.get('version')}; this build reads "
                              f"version {FORMAT_VERSION}")
    model = IrnNet(obj["arch"], int(obj["crop_size"]))
    try:
        model.load_state_dict(obj["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{uri} does not match an IRN network on {obj['arch']}: "
                              f"{str(e).splitlines()[0][:300]}") from e
    return model.eval(), dict(obj.get("extra", {}))

