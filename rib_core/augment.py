"""Image operations of IRN's ``misc/imutils.py``, written for numpy HWC arrays.

Randomness comes from a ``random.Random`` passed in, so a run can be replayed exactly.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

# ImageNet statistics, IRN's TorchvisionNormalize (voc12/dataloader.py).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def normalize(img: np.ndarray) -> np.ndarray:
    """uint8 HWC RGB -> float32 HWC, ImageNet mean and std."""
    out = img.astype(np.float32) / 255.0
    return (out - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)


def denormalize(chw: torch.Tensor) -> np.ndarray:
    """Inverse of ``normalize`` for a CHW tensor, back to uint8 HWC (for pictures)."""
    hwc = chw.detach().cpu().permute(1, 2, 0).numpy() * np.asarray(STD) + np.asarray(MEAN)
    return np.clip(hwc * 255.0 + 0.5, 0, 255).astype(np.uint8)


def resize(img: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize to (h, w): bicubic for images, nearest for label maps (IRN's ``pil_resize``)."""
    if img.shape[:2] == tuple(size):
        return img
    resample = Image.NEAREST if nearest else Image.BICUBIC
    return np.asarray(Image.fromarray(img).resize((size[1], size[0]), resample))


def rescale(img: np.ndarray, scale: float, nearest: bool = False) -> np.ndarray:
    h, w = img.shape[:2]
    return resize(img, (int(np.round(h * scale)), int(np.round(w * scale))), nearest)


def random_resize_long(img: np.ndarray, min_long: int, max_long: int, rng: random.Random,
                       ) -> np.ndarray:
    """Scale so that the longer side is a random length in [min_long, max_long]."""
    target = rng.randint(min_long, max_long)
    h, w = img.shape[:2]
    return rescale(img, target / (h if w < h else w))


def random_scale(arrays: tuple[np.ndarray, ...], scale_range: tuple[float, float],
                 rng: random.Random) -> tuple[np.ndarray, ...]:
    """Rescale an image and its label maps together by one random factor (label maps nearest)."""
    s = scale_range[0] + rng.random() * (scale_range[1] - scale_range[0])
    return tuple(rescale(a, s, nearest=i > 0) for i, a in enumerate(arrays))


def random_lr_flip(arrays: tuple[np.ndarray, ...], rng: random.Random) -> tuple[np.ndarray, ...]:
    if rng.getrandbits(1):
        return tuple(np.ascontiguousarray(np.fliplr(a)) for a in arrays)
    return arrays


def crop_box(size: tuple[int, int], crop: int, rng: random.Random | None) -> tuple[int, ...]:
    """IRN's ``get_random_crop_box``; ``rng=None`` gives the top-left box."""
    h, w = size
    ch, cw = min(crop, h), min(crop, w)
    w_space, h_space = w - crop, h - crop
    pick = (lambda n: rng.randrange(n + 1)) if rng is not None else (lambda n: 0)
    cont_left, img_left = (0, pick(w_space)) if w_space > 0 else (pick(-w_space), 0)
    cont_top, img_top = (0, pick(h_space)) if h_space > 0 else (pick(-h_space), 0)
    return (cont_top, cont_top + ch, cont_left, cont_left + cw,
            img_top, img_top + ch, img_left, img_left + cw)


def crop(arrays: tuple[np.ndarray, ...], size: int, fill: tuple[float, ...],
         rng: random.Random | None) -> tuple[np.ndarray, ...]:
    """Square crop of ``size``; smaller inputs are padded with ``fill`` (random or top-left)."""
    box = crop_box(arrays[0].shape[:2], size, rng)
    out = []
    for a, f in zip(arrays, fill, strict=True):
        cont = np.full((size, size, *a.shape[2:]), f, a.dtype)
        cont[box[0]:box[1], box[2]:box[3]] = a[box[4]:box[5], box[6]:box[7]]
        out.append(cont)
    return tuple(out)


def to_chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def multiscale_flip_batches(img: np.ndarray, scales: tuple[float, ...]) -> list[torch.Tensor]:
    """For each scale, a [2, 3, h, w] batch of the normalised image and its mirror.

    IRN's ``VOC12ClassificationDatasetMSF``: bicubic rescale, then normalise.
    """
    batches = []
    for s in scales:
        chw = to_chw(normalize(img if s == 1 else rescale(img, s)))
        batches.append(torch.stack([chw, chw.flip(-1)]))
    return batches


def strided_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    return (size[0] + stride - 1) // stride, (size[1] + stride - 1) // stride


def strided_up_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    h, w = strided_size(size, stride)
    return h * stride, w * stride
