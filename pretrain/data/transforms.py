"""Views: what a CPU worker makes of one decoded image, and what the device does to the batch.

Workers decode, crop and flip, and hand over uint8 tensors (4x less to copy than float32); the
device normalizes them. Each view builder returns a picklable callable ``PIL.Image -> dict``.

Decoding is most of a worker's time, so the views here decode as little as they can: they choose
the crop from the image header first, let libjpeg-turbo decode at 1/2, 1/4 or 1/8 scale when the
crop will be shrunk at least that much anyway (see pretrain.data.decode), and crop before
resizing, in one resampling pass. Such views set ``decodes_itself = True`` and receive an :class:`EncodedImage` (bytes and
size); they also accept a decoded PIL image.
"""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data.auto_augment import AugmentOp
from timm.data.transforms_factory import transforms_imagenet_train

from pretrain.data.decode import EncodedImage, decode_pixels
from pretrain.data.device_decode import ViewPlan

def crop_resize(image: EncodedImage | Image.Image, box: tuple[float, float, float, float],
                size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """``box`` (left, top, right, bottom, in the image's full-size pixels) of ``image``, resized to
    ``size`` (w, h), as a uint8 CHW tensor.

    When the box will be shrunk by 2, 4 or 8 or more, a JPEG is decoded at that reduced scale;
    the crop is cut before resizing, with torch's antialiased uint8 kernels (about twice as fast as
    PIL's on one core).
    """
    width, height = image.size
    shrink = min((box[2] - box[0]) / size[0], (box[3] - box[1]) / size[1])
    reduce_to = None
    if shrink >= 2:
        factor = 2 ** min(3, int(math.log2(shrink)))
        reduce_to = (math.ceil(width / factor), math.ceil(height / factor))
    pixels = decode_pixels(image, reduce_to)
    sx, sy = pixels.shape[1] / width, pixels.shape[0] / height
    left, top = int(round(box[0] * sx)), int(round(box[1] * sy))
    right, bottom = max(left + 1, int(round(box[2] * sx))), max(top + 1, int(round(box[3] * sy)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only numpy memory: nothing here writes to it
        crop = torch.from_numpy(pixels).permute(2, 0, 1)[None, :, top:bottom, left:right]
    if crop.shape[-2:] == (size[1], size[0]):
        return crop[0].contiguous()
    return F.interpolate(crop, size=(size[1], size[0]), mode=interpolation, antialias=True)[0]


def random_resized_box(width: int, height: int, scale, ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Inception-style random crop (area in ``scale``, log-uniform aspect in ``ratio``), as
    torchvision and timm sample it: ten tries, then a centre crop clamped to ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = random.uniform(*scale) * area
        aspect = math.exp(random.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = random.randint(0, height - h)
            left = random.randint(0, width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    w, h = width, height
    if in_ratio < min(ratio):
        h = max(1, int(round(w / min(ratio))))
    elif in_ratio > max(ratio):
        w = max(1, int(round(h * max(ratio))))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _posterize(image: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """Posterize to ``bits_to_keep`` bits, where 0 bits gives a black image as Pillow < 13 did."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep < 1:
        return image.point(lambda _: 0)
    return ImageOps.posterize(image, bits_to_keep)


def _allow_zero_bit_posterize(photometric) -> None:
    """timm's increasing posterize keeps 0 bits at magnitude 10, which ``mstd`` reaches (m9-mstd0.5:
    about 2% of its draws); Pillow 13 raises there, which ended a run mid-epoch."""
    stack = [photometric]
    while stack:
        node = stack.pop()
        if isinstance(node, AugmentOp):
            if node.name.startswith("Posterize"):
                node.aug_fn = _posterize
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        else:
            stack.extend(getattr(node, attr) for attr in ("transforms", "ops", "policy") if hasattr(node, attr))


class SupervisedTrainView:
    """timm's ImageNet training recipe (RandomResizedCrop, flip, RandAugment or colour jitter) up to uint8.

    The crop and flip are done here (reduced decoding, crop before resize); the photometric part
    is timm's. Random erasing needs normalized pixels, so it runs on the device.
    """

    decodes_itself = True

    def __init__(self, image_size: int, scale, ratio, hflip: float, auto_augment: str | None,
                 color_jitter: float, interpolation: str, mean) -> None:
        self.size = (image_size, image_size)
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self.interpolation = interpolation
        _, photometric, _ = transforms_imagenet_train(
            image_size, scale=scale, ratio=ratio, hflip=hflip, color_jitter=color_jitter,
            auto_augment=auto_augment, interpolation="bicubic" if interpolation == "random" else interpolation,
            mean=mean, use_prefetcher=True, separate=True)
        self.photometric = photometric if (auto_augment or color_jitter) else None
        if self.photometric is not None:
            _allow_zero_bit_posterize(self.photometric)

    @property
    def supports_device_decode(self) -> bool:
        return self.photometric is None  # timm's RandAugment and colour jitter need the pixels here

    def _draw(self, size: tuple[int, int]) -> tuple[tuple[int, int, int, int], str, bool]:
        """The random crop box, interpolation and flip for an image of ``size`` (w, h)."""
        box = random_resized_box(*size, self.scale, self.ratio)
        interpolation = random.choice(["bilinear", "bicubic"]) if self.interpolation == "random" \
            else self.interpolation
        flip = self.hflip > 0 and random.random() < self.hflip
        return box, interpolation, flip

    def plan(self, size: tuple[int, int]) -> dict[str, ViewPlan]:
        """What ``__call__`` would draw for an image of ``size``, for decoding on the device."""
        box, interpolation, flip = self._draw(size)
        return {"image": ViewPlan((box,), (flip,), self.size, interpolation, stacked=False)}

    def __call__(self, image: Image.Image) -> dict:
        box, interpolation, flip = self._draw(image.size)
        pixels = crop_resize(image, box, self.size, interpolation)
        if flip:
            pixels = pixels.flip(-1)
        if self.photometric is not None:  # timm's RandAugment / colour jitter work on PIL images
            pixels = torch.from_numpy(np.array(self.photometric(Image.fromarray(pixels.permute(1, 2, 0).numpy()))))
            pixels = pixels.permute(2, 0, 1)
        return {"image": pixels}


class EvalView:
    """Resize the short side to ``image_size / crop_pct``, centre crop ``image_size``, uint8."""

    decodes_itself = True

    def __init__(self, image_size: int, crop_pct: float, interpolation: str = "bicubic") -> None:
        self.size = image_size
        self.crop_pct = crop_pct
        self.interpolation = interpolation

    def __call__(self, image: Image.Image) -> dict:
        width, height = image.size
        # The centre crop, in full-size pixels: image_size / (image_size / crop_pct) of the short side.
        side = min(width, height) * self.crop_pct
        left, top = (width - side) / 2, (height - side) / 2
        box = (left, top, left + side, top + side)
        return {"image": crop_resize(image, box, (self.size, self.size), self.interpolation)}


def normalize(images: torch.Tensor, mean, std, dtype: torch.dtype) -> torch.Tensor:
    """uint8 NCHW on the device -> normalized ``dtype``; float32 arithmetic, then one cast."""
    mean = torch.tensor(mean, device=images.device).mul_(255).view(1, -1, 1, 1)
    inv_std = torch.tensor(std, device=images.device).mul_(255).reciprocal_().view(1, -1, 1, 1)
    return images.float().sub_(mean).mul_(inv_std).to(dtype)
