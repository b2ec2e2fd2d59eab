"""Views: what a CPU worker makes of one decoded image, and what the device does to the batch.

Workers decode, crop and flip, and hand over uint8 tensors (4x less to copy than float32); the
device normalizes them. Each view builder returns a picklable callable ``PIL.Image -> dict``.
"""

from __future__ import annotations

import torch
from PIL import Image
from timm.data import create_transform


class SupervisedTrainView:
    """timm's ImageNet training recipe (RandomResizedCrop, flip, RandAugment) up to uint8.

    Random erasing needs normalized pixels, so it runs on the device (see ``RandomErasingOnDevice``).
    """

    def __init__(self, image_size: int, scale, ratio, hflip: float, auto_augment: str | None,
                 color_jitter: float, interpolation: str, mean) -> None:
        self.transform = create_transform(
            image_size, is_training=True, scale=scale, ratio=ratio, hflip=hflip,
            color_jitter=color_jitter, auto_augment=auto_augment, interpolation=interpolation,
            mean=mean, use_prefetcher=True)

    def __call__(self, image: Image.Image) -> dict:
        return {"image": self.transform(image)}


class EvalView:
    """Resize the short side to ``image_size / crop_pct``, centre crop, uint8."""

    def __init__(self, image_size: int, crop_pct: float, interpolation: str = "bicubic") -> None:
        self.transform = create_transform(image_size, is_training=False, crop_pct=crop_pct,
                                          interpolation=interpolation, use_prefetcher=True)

    def __call__(self, image: Image.Image) -> dict:
        return {"image": self.transform(image)}


def normalize(images: torch.Tensor, mean, std, dtype: torch.dtype) -> torch.Tensor:
    """uint8 NCHW on the device -> normalized ``dtype``; float32 arithmetic, then one cast."""
    mean = torch.tensor(mean, device=images.device).mul_(255).view(1, -1, 1, 1)
    inv_std = torch.tensor(std, device=images.device).mul_(255).reciprocal_().view(1, -1, 1, 1)
    return images.float().sub_(mean).mul_(inv_std).to(dtype)
