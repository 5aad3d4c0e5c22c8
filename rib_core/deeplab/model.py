"""DeepLab networks for the final segmentation step (paper section 4.1 and appendix A.1).

The paper trains "the PyTorch implementation of DeepLab-v2-ResNet101 offered by [42]"
(kazuto1011/deeplab-pytorch): a ResNet whose stages 4 and 5 keep stride 1 with dilation 2 and 4
(output stride 8), an ASPP of four 3x3 convolutions with rates 6/12/18/24 whose outputs are summed,
and "MSC" multi-scale inputs: the image at scale 1 and at 0.5 and 0.75, each scored, and their
pixel-wise maximum (``libs/models/msc.py``). torchvision's DeepLabV3 is the alternative head.

Backbones are torchvision ResNets built without weights; initial weights only ever come from a
path or s3:// URI the user gives (:func:`load_initial_weights`), nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import segmentation
from torchvision.models._utils import IntermediateLayerGetter

from rib_core.config.stage_configs import ModelKind
from rib_core.training.checkpoints import CheckpointError, load_backbone, read_checkpoint, save_atomically
from rib_core.training.networks import BACKBONES, feature_channels

DEEPLAB_FORMAT = "rib-deeplab"
DEEPLAB_VERSION = 1


def dilated_resnet(arch: str) -> nn.Module:
    """A weightless torchvision ResNet at output stride 8: DeepLab-v2's dilation 2 in layer3, 4 in layer4.

    Every 3x3 convolution of a stage gets the stage's dilation, as in deeplab-pytorch's
    ``_ResLayer(..., dilation)`` (torchvision's ``replace_stride_with_dilation`` keeps the first block
    of a stage at the previous dilation and refuses BasicBlock ResNets, which the tests use).
    """
    if arch not in BACKBONES:
        raise ValueError(f"unknown backbone {arch!r}; choose one of {sorted(BACKBONES)}")
    net = BACKBONES[arch](weights=None)
    for layer, dilation in ((net.layer3, 2), (net.layer4, 4)):
        for m in layer.modules():
            if isinstance(m, nn.Conv2d):
                m.stride = (1, 1)
                if m.kernel_size == (3, 3):
                    m.dilation = m.padding = (dilation, dilation)
    return IntermediateLayerGetter(net, {"layer4": "out"})


class ASPP(nn.Module):
    """DeepLab-v2's ASPP: parallel dilated 3x3 convolutions straight to class scores, summed."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True) for r in rates)
        for conv in self.branches:  # deeplab-pytorch _ASPP: N(0, 0.01) weights, zero bias
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([branch(x) for branch in self.branches]).sum(0)


class DeepLabV2(nn.Module):
    """Dilated ResNet + ASPP; logits at output stride 8 (not upsampled, as deeplab-pytorch)."""

    def __init__(self, num_classes: int, arch: str, rates: Sequence[int]) -> None:
        super().__init__()
        self.backbone = dilated_resnet(arch)
        self.classifier = ASPP(feature_channels(arch), num_classes, rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x)["out"])


def build_deeplabv3(num_classes: int, arch: str) -> segmentation.DeepLabV3:
    """torchvision's DeepLabV3 without any weights; ResNet-18/34 (tests) get the same head on
    :func:`dilated_resnet`, since torchvision only builds it on ResNet-50/101."""
    if arch == "resnet101":
        return segmentation.deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=num_classes,
                                                aux_loss=False)
    if arch == "resnet50":
        return segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=num_classes,
                                               aux_loss=False)
    return segmentation.DeepLabV3(dilated_resnet(arch), segmentation.deeplabv3.DeepLabHead(
        feature_channels(arch), num_classes))


class DeepLab(nn.Module):
    """The segmentation network with deeplab-pytorch's multi-scale inputs (MSC).

    ``forward`` returns a list of logit maps: the image at scale 1, then one per ``msc_scales``, then
    their pixel-wise maximum at the size of the first. Training puts a loss on each; inference uses
    the last. With ``msc_scales`` empty the list holds one map. ``freeze_bn`` keeps the backbone's
    batch norm in eval mode with fixed affine parameters (deeplab-pytorch ``freeze_bn`` and its
    optimizer, which only lists convolutions).
    """

    def __init__(self, num_classes: int, model: ModelKind = "deeplabv2", arch: str = "resnet101",
                 atrous_rates: Sequence[int] = (6, 12, 18, 24), msc_scales: Sequence[float] = (0.5, 0.75),
                 freeze_bn: bool = True) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.kind = model
        self.arch = arch
        self.atrous_rates = list(atrous_rates)
        self.msc_scales = list(msc_scales)
        self.freeze_bn = freeze_bn
        if model == "deeplabv2":
            self.net: nn.Module = DeepLabV2(num_classes, arch, atrous_rates)
        elif model == "deeplabv3":
            self.net = build_deeplabv3(num_classes, arch)
        else:
            raise ValueError(f"unknown model {model!r}; choose deeplabv2 or deeplabv3")
        if freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.requires_grad_(False)

    @property
    def backbone(self) -> nn.Module:
        return self.net.backbone

    @property
    def head(self) -> nn.Module:
        return self.net.classifier

    def train(self, mode: bool = True) -> DeepLab:
        super().train(mode)
        if self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out["out"] if isinstance(out, Mapping) else out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        full = self.logits(x)
        if not self.msc_scales:
            return [full]
        scaled = [self.logits(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False))
                  for s in self.msc_scales]
        size = full.shape[-2:]
        fused = torch.stack([full, *(F.interpolate(s, size=size, mode="bilinear", align_corners=False)
                                     for s in scaled)]).amax(0)
        return [full, *scaled, fused]

    def param_groups(self, lr: float, weight_decay: float, head_lr_mult: float) -> list[dict[str, Any]]:
        """deeplab-pytorch's three groups: backbone at ``lr``; head weights at ``head_lr_mult x lr``;
        head biases at twice that without weight decay (``get_params`` 1x / 10x / 20x)."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        head = [(n, p) for n, p in self.head.named_parameters() if p.requires_grad]
        return [
            {"params": backbone, "lr": lr, "weight_decay": weight_decay},
            {"params": [p for n, p in head if not n.endswith("bias")], "lr": head_lr_mult * lr,
             "weight_decay": weight_decay},
            {"params": [p for n, p in head if n.endswith("bias")], "lr": 2 * head_lr_mult * lr, "weight_decay": 0.0},
        ]

    def describe(self) -> dict[str, Any]:
        """Everything needed to rebuild the network, stored in checkpoints."""
        return {"model": self.kind, "arch": self.arch, "atrous_rates": self.atrous_rates,
                "msc_scales": self.msc_scales, "num_classes": self.num_classes}


def save_deeplab(model: DeepLab, classes: Sequence[str], path: str | os.PathLike[str],
                 extra: Mapping[str, Any] | None = None) -> None:
    """Write a trained network in our format, atomically."""
    payload = {"format": DEEPLAB_FORMAT, "version": DEEPLAB_VERSION, **model.describe(), "classes": list(classes),
               "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "extra": dict(extra or {})}
    save_atomically(payload, path)


def load_deeplab(uri: str | os.PathLike[str]) -> tuple[DeepLab, list[str], dict[str, Any]]:
    """A network written by :func:`save_deeplab`, from a path or s3:// URI: (model, classes, extra),
    in eval mode."""
    obj = read_checkpoint(uri)
    if not isinstance(obj, Mapping) or obj.get("format") != DEEPLAB_FORMAT:
        raise CheckpointError(f"{uri} is not a {DEEPLAB_FORMAT} checkpoint")
    if obj.get("version") != DEEPLAB_VERSION:
        raise CheckpointError(f"{uri} has format version {obj.get('version')}; this build reads {DEEPLAB_VERSION}")
    model = DeepLab(obj["num_classes"], obj["model"], obj["arch"], obj["atrous_rates"], obj["msc_scales"])
    model.load_state_dict(obj["state_dict"])
    return model.eval(), list(obj["classes"]), dict(obj.get("extra", {}))


def load_initial_weights(model: DeepLab, uri: str | os.PathLike[str]) -> str:
    """Initial weights from a user-given file; returns what kind of file it was.

    Accepted: a DeepLab checkpoint of ours (the whole network, same classes), a CAM classifier
    (ours or IRN/RIB's ``res50_cam.pth``: its backbone) or a torchvision ResNet state dict such
    as ImageNet weights (the paper's initialisation, section 4.1; ``fc.*`` is dropped).
    """
    obj = read_checkpoint(uri)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{uri} holds a {type(obj).__name__}, not a state dict or a checkpoint")
    if obj.get("format") == DEEPLAB_FORMAT:
        if obj["num_classes"] != model.num_classes or obj["model"] != model.kind or obj["arch"] != model.arch:
            raise CheckpointError(f"{uri} is a {obj['model']}/{obj['arch']} with {obj['num_classes']} outputs; "
                                  f"this run builds a {model.kind}/{model.arch} with {model.num_classes}")
        model.load_state_dict(obj["state_dict"])
        return "deeplab"
    return load_backbone(model.backbone, model.arch, uri)
