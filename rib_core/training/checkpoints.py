"""Classifier checkpoints: our own format, and the official IRN/RIB ``res50_cam.pth`` as is.

Our format is a dict ``{"format": "rib-cam", "version": 1, "arch", "classes", "state_dict",
"extra"}`` so that a checkpoint says what it is. The official file is a bare state dict of
IRN's ``net.resnet50_cam.Net``: the ResNet under ``resnet50.*`` (the same names as torchvision's),
the classifier under ``classifier.weight``, and the same tensors again under the aliases
``stage1-4.*``, ``backbone.N.*`` and ``newly_added.*`` (a state dict repeats shared modules).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from rib_core.data.classes import COCO_CLASSES, VOC_CLASSES
from rib_core.io.storage import read_bytes
from rib_core.training.networks import CamNet

FORMAT = "rib-cam"
FORMAT_VERSION = 1
_OFFICIAL_ALIASES = ("stage1.", "stage2.", "stage3.", "stage4.", "backbone.", "newly_added.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why."""


def save_classifier(model: CamNet, classes: Sequence[str], path: str | os.PathLike[str],
                    extra: Mapping[str, Any] | None = None) -> None:
    """Write ``model`` in our format (atomically: a crash never leaves half a file)."""
    payload = {
        "format": FORMAT, "version": FORMAT_VERSION, "arch": model.arch, "classes": list(classes),
        "state_dict": model.state_dict(), "extra": dict(extra or {}),
    }
    save_atomically(payload, path)


def save_atomically(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` through a temporary file and a rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_checkpoint(uri: str | os.PathLike[str]) -> Any:
    """A PyTorch file (tensors and plain data only) from a path or s3:// URI, with errors that
    say what is wrong with it."""
    try:
        raw = read_bytes(uri)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint not found: {uri}") from e
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for garbage bytes
        raise CheckpointError(f"{uri} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from e


def official_to_ours(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an IRN/RIB ``res50_cam.pth`` state dict to :class:`CamNet` names.

    ``resnet50.X`` becomes ``backbone.X``; the aliases are dropped after checking they hold the
    same tensors (a file where they differ was edited and is refused).
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    ours: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("resnet50."):
            ours["backbone." + key[len("resnet50."):]] = value
        elif key == "classifier.weight":
            ours[key] = value
        elif not key.startswith(_OFFICIAL_ALIASES):
            raise CheckpointError(f"unexpected key {key!r} in an IRN/RIB classifier checkpoint")
    for alias, canonical in (("stage4.0.0.conv1.weight", "resnet50.layer4.0.conv1.weight"),
                             ("newly_added.0.weight", "classifier.weight")):
        if alias in state and canonical in state and not torch.equal(state[alias], state[canonical]):
            raise CheckpointError(f"{alias} differs from {canonical}: the checkpoint was edited")
    return ours


def is_official_layout(state: Mapping[str, Any]) -> bool:
    keys = {k.removeprefix("module.") for k in state}
    return "resnet50.conv1.weight" in keys and "classifier.weight" in keys


def _classes_for(num_classes: int, classes: Sequence[str] | None) -> list[str]:
    if classes is not None:
        if len(classes) != num_classes:
            raise CheckpointError(f"the checkpoint has {num_classes} classes but {len(classes)} class "
                                  "names were given")
        return list(classes)
    if num_classes == len(VOC_CLASSES):
        return list(VOC_CLASSES)
    if num_classes == len(COCO_CLASSES):
        return list(COCO_CLASSES)
    raise CheckpointError(f"the checkpoint has {num_classes} classes and no class names; pass them")


def load_classifier(uri: str | os.PathLike[str], classes: Sequence[str] | None = None,
                    ) -> tuple[CamNet, list[str], dict[str, Any]]:
    """Load a classifier from a path or s3:// URI, in our format or the official one.

    Returns ``(model, class_names, extra)``. The official file has no class names: 20 classes are
    taken as VOC's, 80 as COCO's, unless ``classes`` says otherwise.
    """
    obj = read_checkpoint(uri)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{uri} holds a {type(obj).__name__}, not a state dict or a checkpoint")
    if obj.get("format") == FORMAT:
        if obj.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"{uri} has checkpoint format version {obj.get('version')}; this "
                                  f"build reads version {FORMAT_VERSION}")
        arch, state, extra = obj["arch"], obj["state_dict"], dict(obj.get("extra", {}))
        names = list(obj["classes"]) if classes is None else list(classes)
    elif is_official_layout(obj):
        arch, state, extra = "resnet50", official_to_ours(obj), {"source": "irn-official"}
        names = _classes_for(state["classifier.weight"].shape[0], classes)
    else:
        sample = ", ".join(list(obj)[:5])
        raise CheckpointError(f"{uri} is neither a rib-cam checkpoint nor an IRN/RIB res50_cam.pth "
                              f"state dict (first keys: {sample})")
    model = CamNet(len(names), arch)
    _load_state(model, state, str(uri))
    return model, names, extra


def load_backbone(backbone: torch.nn.Module, arch: str, uri: str | os.PathLike[str]) -> str:
    """Initial backbone weights from a user-given file, for every network that starts from a ResNet
    (the classifier, IRN, DeepLab); returns what kind of file it was.

    Accepted: a CAM classifier (ours, or IRN/RIB's ``res50_cam.pth``: its backbone) or a
    torchvision ResNet state dict such as ImageNet weights (the paper's initialisation). ``fc.*``
    is ignored on both sides. Anything else, or another ``arch``, is refused with the reason.
    """
    obj = read_checkpoint(uri)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{uri} holds a {type(obj).__name__}, not a state dict or a checkpoint")
    if obj.get("format") == FORMAT or is_official_layout(obj):
        classifier, _, _ = load_classifier(uri)
        if classifier.arch != arch:
            raise CheckpointError(f"{uri} has a {classifier.arch} backbone; this network is a {arch}: give a "
                                  f"{arch} checkpoint or set its arch to {classifier.arch}")
        state, kind = classifier.backbone.state_dict(), "classifier"
    else:
        state, kind = dict(obj), "resnet"
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = {k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    bad_shape = [k for k in set(state) & set(expected) if state[k].shape != expected[k].shape]
    if missing or unexpected or bad_shape:
        raise CheckpointError(f"{uri} is not a torchvision {arch} state dict (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, wrong shape {bad_shape[:3]})")
    backbone.load_state_dict(state, strict=False)  # everything but fc.*, checked above
    return kind


def _load_state(model: CamNet, state: Mapping[str, torch.Tensor], uri: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{uri} does not match a {model.arch} CAM network: missing "
                              f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                              f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(f"{uri}: {key} has shape {tuple(tensor.shape)}, the network "
                                  f"expects {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=True)
