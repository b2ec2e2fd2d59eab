"""Self-supervised views: crops on the CPU, photometric augmentation batched on the device.

A CPU worker only decodes and crops: each view is one PIL ``resize`` of a box of the decoded image
(crop and resize in one pass), flipped, handed over as uint8. Colour jitter, grayscale, blur and
solarization then run on whole uint8 batches on the accelerator (:class:`Photometric`), where they
are nearly free, instead of image by image in PIL, where they cost most of a worker's time.
With ``data.decode_on_device``, a worker does not even decode: ``plan`` draws the same boxes and
flips from the image header, and the device cuts them (pretrain.data.device_decode).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pretrain.data.device_decode import ViewPlan
from pretrain.data.transforms import random_resized_box

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def draw_crops(image_size: tuple[int, int], count: int, scale: tuple[float, float],
               hflip: float) -> tuple[tuple[tuple[int, int, int, int], ...], tuple[bool, ...]]:
    """``count`` random boxes and flips for an image of ``image_size`` (w, h), drawn crop by crop."""
    boxes, flips = [], []
    for _ in range(count):
        boxes.append(random_resized_box(*image_size, scale))
        flips.append(random.random() < hflip)
    return tuple(boxes), tuple(flips)


def crop_views(image: Image.Image, count: int, size: int, scale: tuple[float, float], hflip: float,
               resample: int) -> torch.Tensor:
    """``count`` random crops of ``image``, each one PIL resize of its box, as N x 3 x size x size uint8."""
    views = []
    for box, flip in zip(*draw_crops(image.size, count, scale, hflip)):
        view = image.resize((size, size), resample, box=box, reducing_gap=3.0)
        views.append(np.asarray(view.transpose(Image.FLIP_LEFT_RIGHT) if flip else view))
    return _stack(views)


def _stack(views: list[np.ndarray]) -> torch.Tensor:
    """HWC uint8 arrays -> one NCHW uint8 tensor."""
    return torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).contiguous()


class MultiCropView:
    """DINO's multi-crop: ``global`` (2 x 3 x G x G) and ``local`` (N x 3 x L x L) uint8 crops."""

    supports_device_decode = True  # see plan()

    def __init__(self, global_size: int, global_scale, local_size: int, local_scale, local_crops: int,
                 hflip: float = 0.5, interpolation: str = "bicubic") -> None:
        self.global_size, self.global_scale = global_size, tuple(global_scale)
        self.local_size, self.local_scale, self.local_crops = local_size, tuple(local_scale), local_crops
        self.hflip = hflip
        self.interpolation, self.resample = interpolation, _RESAMPLE[interpolation]

    def __call__(self, image: Image.Image) -> dict:
        out = {"global": crop_views(image, 2, self.global_size, self.global_scale, self.hflip, self.resample)}
        if self.local_crops:
            out["local"] = crop_views(image, self.local_crops, self.local_size, self.local_scale, self.hflip,
                                      self.resample)
        return out

    def plan(self, image_size: tuple[int, int]) -> dict[str, ViewPlan]:
        """The crops ``__call__`` would draw for an image of ``image_size``, for decoding on the device."""
        out = {"global": _plan(draw_crops(image_size, 2, self.global_scale, self.hflip), self.global_size,
                               self.interpolation)}
        if self.local_crops:
            out["local"] = _plan(draw_crops(image_size, self.local_crops, self.local_scale, self.hflip),
                                 self.local_size, self.interpolation)
        return out


class TwoView:
    """MoBY's two views of one image: ``views`` (2 x 3 x S x S) uint8 crops."""

    supports_device_decode = True  # see plan()

    def __init__(self, size: int, scale, hflip: float = 0.5, interpolation: str = "bicubic") -> None:
        self.size, self.scale, self.hflip = size, tuple(scale), hflip
        self.interpolation, self.resample = interpolation, _RESAMPLE[interpolation]

    def __call__(self, image: Image.Image) -> dict:
        return {"views": crop_views(image, 2, self.size, self.scale, self.hflip, self.resample)}

    def plan(self, image_size: tuple[int, int]) -> dict[str, ViewPlan]:
        """The crops ``__call__`` would draw for an image of ``image_size``, for decoding on the device."""
        return {"views": _plan(draw_crops(image_size, 2, self.scale, self.hflip), self.size, self.interpolation)}


def _plan(crops, size: int, interpolation: str) -> ViewPlan:
    boxes, flips = crops
    return ViewPlan(boxes, flips, (size, size), interpolation, stacked=True)


# ---------------------------------------------------------------------------------------------
# On the device


@dataclass(frozen=True)
class Photometric:
    """Per-image random photometric augmentation of a uint8 NCHW batch, returning floats in [0, 1].

    The recipe of BYOL/DINO/MoBY: colour jitter (with probability ``jitter``; brightness, contrast,
    saturation, hue in a random order per batch), grayscale, Gaussian blur (sigma uniform in
    ``blur_sigma``), solarization at 128. Each image draws its own factors and coin flips.
    Every draw is a tensor on the device, so a call makes no host sync and traces as one graph.
    """

    jitter: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale: float = 0.2
    blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize: float = 0.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0)
        n = x.shape[0]

        def coin(p: float) -> torch.Tensor:
            return (torch.rand(n, 1, 1, 1, device=x.device) < p) if p > 0 else None

        jitter = coin(self.jitter)
        if jitter is not None:
            x = torch.where(jitter, self._jitter(x), x)
        gray = coin(self.grayscale)
        if gray is not None:
            x = torch.where(gray, _gray(x).expand_as(x), x)
        blur = coin(self.blur)
        if blur is not None:
            sigma = torch.empty(n, device=x.device).uniform_(*self.blur_sigma)
            x = torch.where(blur, _gaussian_blur(x, sigma, self.blur_sigma[1]), x)
        solarize = coin(self.solarize)
        if solarize is not None:
            x = torch.where(solarize & (x >= 128 / 255), 1.0 - x, x)
        return x

    def _jitter(self, x: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast, saturation and hue, each image by its own factors, in an order
        drawn for the batch. The order is a tensor (reading it on the host would wait for the
        device): each place in it computes the operations it may name and keeps the one it names.
        Brightness, contrast and saturation are one blend, ``lerp(anchor, x, factor)``, towards
        black, the mean gray or the gray image, so a place computes one blend and one hue shift."""
        n = x.shape[0]
        amounts = {"b": self.brightness, "c": self.contrast, "s": self.saturation, "h": self.hue}
        ops = [op for op, amount in amounts.items() if amount > 0]
        index = {op: i for i, op in enumerate(ops)}
        factors = torch.stack([torch.empty(n, device=x.device).uniform_(*_factor_range(op, amounts[op]))
                               for op in ops], dim=1)
        order = torch.randperm(len(ops), device=x.device)
        for place in range(len(ops)):
            op = order[place]
            factor = factors.index_select(1, op.view(1)).view(n, 1, 1, 1)
            gray = _gray(x)
            anchor = torch.where(op == index.get("b", -1), 0.0,
                                 torch.where(op == index.get("c", -1), gray.mean(dim=(1, 2, 3), keepdim=True), gray))
            y = torch.lerp(anchor.expand_as(x), x, factor)
            if "h" in index:
                y = torch.where(op == index["h"], _shift_hue(x, factor), y)
            x = y.clamp(0, 1)
        return x


def _factor_range(op: str, amount: float) -> tuple[float, float]:
    """Hue shifts by up to ``amount`` turns either way; the others scale by 1 +- ``amount``."""
    return (-amount, amount) if op == "h" else (1.0 - amount, 1.0 + amount)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma with torchvision's weights, N1HW."""
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images in [0, 1] by ``shift`` turns (N111)."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    high, argmax = x.max(dim=1)
    low = x.min(dim=1).values
    chroma = high - low
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(argmax == 0, ((g - b) / safe) % 6,
                      torch.where(argmax == 1, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))
    hue = (hue + shift[:, 0]) % 1.0
    # HSV -> RGB with value = high and chroma unchanged.
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + hue[:, None] * 6) % 6
    return high[:, None] - chroma[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, one sigma per image; reflect padding."""
    n, c, h, w = x.shape
    radius = min(int(math.ceil(3 * max_sigma)), (min(h, w) - 1))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, k)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)
