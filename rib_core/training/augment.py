"""Image operations of IRN's ``misc/imutils.py``, written for numpy HWC arrays.

Randomness comes from a ``random.Random`` passed in, so a run can be replayed exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
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


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(h, w) times ``scale``, rounded to whole pixels."""
    return int(np.round(size[0] * scale)), int(np.round(size[1] * scale))


def rescale(img: np.ndarray, scale: float, nearest: bool = False) -> np.ndarray:
    return resize(img, scaled_size(img.shape[:2], scale), nearest)


def long_side_size(size: tuple[int, int], long: int) -> tuple[int, int]:
    """(h, w) scaled so that the longer side is ``long`` (IRN's random resize-long)."""
    return scaled_size(size, long / max(size))


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
    return paste_crop(arrays, size, fill, crop_box(arrays[0].shape[:2], size, rng))


def paste_crop(arrays: tuple[np.ndarray, ...], size: int, fill: tuple[float, ...],
               box: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    out = []
    for a, f in zip(arrays, fill, strict=True):
        cont = np.full((size, size, *a.shape[2:]), f, a.dtype)
        cont[box[0]:box[1], box[2]:box[3]] = a[box[4]:box[5], box[6]:box[7]]
        out.append(cont)
    return tuple(out)


@dataclass(frozen=True)
class CropDraw:
    """The random choices of IRN's training augmentation for one image, apart from its pixels.

    Drawing them first (in IRN's order: resize, flip, crop box) lets the host path (PIL, one image
    at a time) and the device path (one batched ``grid_sample``) make the same crops.
    """

    size: tuple[int, int]   # (h, w) after the random long-side resize
    flip: bool
    box: tuple[int, ...]    # ``crop_box`` of the resized image
    crop_size: int


def draw_crop(size: tuple[int, int], crop_size: int, resize_long: tuple[int, int] | None, hflip: bool,
              rng: random.Random) -> CropDraw:
    resized = long_side_size(size, rng.randint(*resize_long)) if resize_long else size
    flip = bool(rng.getrandbits(1)) if hflip else False
    return CropDraw(resized, flip, crop_box(resized, crop_size, rng), crop_size)


def apply_crop(img: np.ndarray, draw: CropDraw) -> torch.Tensor:
    """uint8 HWC image -> normalised CHW crop, on the host (bicubic PIL resize), as IRN does it."""
    x = normalize(resize(img, draw.size))
    if draw.flip:
        x = x[:, ::-1]
    (x,) = paste_crop((x,), draw.crop_size, (0.0,), draw.box)
    return to_chw(x)


def crops_on_device(images: torch.Tensor, sizes: torch.Tensor, draws: list[CropDraw]) -> torch.Tensor:
    """The crops of :func:`apply_crop` for a batch at once, on the images' device.

    ``images`` [B, H, W, 3] uint8 holds image b in its top-left ``sizes[b]`` corner with its last
    row and column repeated to the edge (so bicubic taps outside the image read the border, as PIL
    does). One ``grid_sample`` does resize, flip and crop: resized pixel r of an image resized from
    n to m pixels samples source position (r + 0.5) * n / m - 0.5, PIL's pixel-centre mapping.
    Unlike PIL it does not widen the kernel when shrinking (no antialiasing); docs/FIDELITY.md.
    Returns [B, 3, crop, crop] float32, normalised, 0 outside the pasted region.
    """
    device, crop = images.device, draws[0].crop_size
    boxes = torch.tensor([d.box for d in draws], dtype=torch.float32, device=device)
    resized = torch.tensor([d.size for d in draws], dtype=torch.float32, device=device)
    flips = torch.tensor([d.flip for d in draws], dtype=torch.bool, device=device)
    src = sizes.to(device=device, dtype=torch.float32)
    o = torch.arange(crop, dtype=torch.float32, device=device)
    ry = o[None] - boxes[:, 0:1] + boxes[:, 4:5]            # row of the resized image [B, crop]
    rx = o[None] - boxes[:, 2:3] + boxes[:, 6:7]
    rx = torch.where(flips[:, None], resized[:, 1:2] - 1 - rx, rx)
    sy = (ry + 0.5) * src[:, 0:1] / resized[:, 0:1] - 0.5   # source position
    sx = (rx + 0.5) * src[:, 1:2] / resized[:, 1:2] - 0.5
    height, width = images.shape[1:3]
    gy, gx = (2 * sy + 1) / height - 1, (2 * sx + 1) / width - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    x = F.grid_sample(images.permute(0, 3, 1, 2).float(), grid, mode="bicubic", padding_mode="border",
                      align_corners=False).clamp_(0, 255)
    mean = torch.tensor(MEAN, device=device)[:, None, None] * 255
    std = torch.tensor(STD, device=device)[:, None, None] * 255
    inside_y = (o[None] >= boxes[:, 0:1]) & (o[None] < boxes[:, 1:2])
    inside_x = (o[None] >= boxes[:, 2:3]) & (o[None] < boxes[:, 3:4])
    inside = inside_y[:, None, :, None] & inside_x[:, None, None, :]
    return (x - mean) / std * inside


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
