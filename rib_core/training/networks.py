"""The CAM classifier in the IRN layout (jiwoon-ahn/irn ``net/resnet50_cam.py``).

A torchvision ResNet with strides (2, 2, 2, 1) so that the last feature map has output stride 16,
batch norm whose statistics never change (``FixedBatchNorm`` in IRN's ``net/resnet50.py``), conv1 and
bn1 frozen, the output of stage 2 detached (no gradient reaches stages 1-2), and a bias-free 1x1
classifier. ``logits`` pools then classifies; ``cam`` classifies every pixel. Because the classifier
is linear, ``logits == gap(cam)``, which RIB relies on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

BACKBONES: dict[str, Callable[..., models.ResNet]] = {
    "resnet18": models.resnet18,
    "resnet34": models.resnet34,
    "resnet50": models.resnet50,
    "resnet101": models.resnet101,
}


class FixedBatchNorm(nn.BatchNorm2d):
    """Batch norm that normalises with its stored statistics, as IRN's ``FixedBatchNorm``.

    The affine weight and bias stay trainable. ``frozen = False`` restores ordinary batch norm,
    which only a classifier trained from scratch (the demo, no ImageNet weights here) needs.
    """

    frozen: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, eps=self.eps)
        return super().forward(x)


def build_resnet(arch: str) -> models.ResNet:
    """A torchvision ResNet without ImageNet weights, with IRN's strides (2, 2, 2, 1)."""
    if arch not in BACKBONES:
        raise ValueError(f"unknown backbone {arch!r}; choose one of {sorted(BACKBONES)}")
    net = BACKBONES[arch](weights=None, norm_layer=FixedBatchNorm)
    # IRN keeps layer4 at stride 1 without dilation (net/resnet50.py, strides=(2, 2, 2, 1)).
    first = net.layer4[0]
    strided_conv = first.conv2 if isinstance(first, models.resnet.Bottleneck) else first.conv1
    strided_conv.stride = (1, 1)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)
    net.fc = nn.Identity()
    return net


def feature_channels(arch: str) -> int:
    return 512 if arch in ("resnet18", "resnet34") else 2048


class CamNet(nn.Module):
    """Multi-label classifier whose 1x1 classifier, applied per pixel, gives the CAM."""

    def __init__(self, num_classes: int, arch: str = "resnet50") -> None:
        super().__init__()
        self.arch = arch
        self.num_classes = num_classes
        self.backbone = build_resnet(arch)
        self.classifier = nn.Conv2d(feature_channels(arch), num_classes, 1, bias=False)
        self.detach_low = True
        self.set_from_scratch(False)

    def low_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stages 1-2 (conv1 ... layer2). Never trained: IRN detaches their output."""
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        return b.layer2(b.layer1(x))

    def high_features(self, low: torch.Tensor) -> torch.Tensor:
        """Stages 3-4 on the detached stage-2 output: the part RIB fine-tunes."""
        return self.backbone.layer4(self.backbone.layer3(low.detach() if self.detach_low else low))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.high_features(self.low_features(x))

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        """Raw class activation maps [B, C, h, w] at output stride 16 (no ReLU)."""
        return self.classifier(self.features(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Classification logits [B, C]: global average pooling, then the classifier."""
        pooled = self.features(x).mean(dim=(2, 3), keepdim=True)
        return self.classifier(pooled).flatten(1)

    forward = logits

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone, classifier) trainable parameters, as IRN's ``trainable_parameters``.

        Stage 1-2 parameters are listed too, as in IRN: the detach means they get no gradient.
        """
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        return backbone, list(self.classifier.parameters())

    def set_bn_frozen(self, frozen: bool) -> None:
        for m in self.modules():
            if isinstance(m, FixedBatchNorm):
                m.frozen = frozen

    def set_from_scratch(self, enabled: bool) -> None:
        """Train every stage with batch statistics (no ImageNet weights) or use IRN's layout.

        IRN freezes conv1/bn1, detaches stage 2 and freezes BN statistics because its stages 1-2
        hold ImageNet features. Without such weights (the demo), they must learn, so training from
        scratch lifts all three; CAM and RIB always run in IRN's layout (``enabled=False``).
        """
        self.detach_low = not enabled
        self.set_bn_frozen(not enabled)
        for p in [*self.backbone.conv1.parameters(), *self.backbone.bn1.parameters()]:
            p.requires_grad_(enabled)
