"""Mixup and CutMix on the device, as timm's ``Mixup`` computes them (modes ``batch``, ``pair`` and
``elem``; each image mixed with its mirror in the batch, ``images.flip(0)``; CutMix's lambda
corrected for boxes clipped by the border; label smoothing of the soft targets), with every random
draw made by torch on the device.

timm draws with numpy on the host and cuts each box with Python slices: under torch.compile every
new box was a new graph. Here a box is a mask computed from tensors, so the whole mix is one graph
with no host sync. The draws come from torch's generator (which the trainer seeds per micro-step)
instead of numpy's: the same distributions, other samples than timm's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class MixupCutmix:
    mixup_alpha: float  # Beta(alpha, alpha) of Mixup's lambda; 0: no Mixup
    cutmix_alpha: float  # Beta(alpha, alpha) of CutMix's lambda; 0: no CutMix
    prob: float  # share of the units (batch, pairs or images) mixed at all
    switch_prob: float  # with both on: the share of mixed units that take CutMix
    mode: Literal["batch", "pair", "elem"]  # one draw per batch, per mirrored pair, or per image
    label_smoothing: float
    num_classes: int

    def __post_init__(self) -> None:
        if self.mixup_alpha <= 0 and self.cutmix_alpha <= 0:
            raise ValueError("MixupCutmix needs mixup_alpha > 0 or cutmix_alpha > 0")

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixed images, soft targets N x num_classes) of a batch of N (even) images and their labels."""
        n, _, height, width = images.shape
        if n % 2:
            raise ValueError(f"Mixup/CutMix needs an even batch, got {n} images")
        units = {"batch": 1, "pair": n // 2, "elem": n}[self.mode]
        lam, cutmix = self._draw(units, images.device)
        boxes = _boxes(lam, height, width)
        # CutMix's lambda is the share of the image left unpasted, once the box is clipped.
        area = (boxes[1] - boxes[0]) * (boxes[3] - boxes[2])
        lam = torch.where(cutmix, 1.0 - area / float(height * width), lam)
        lam, cutmix, boxes = (self._per_image(v, n) for v in (lam, cutmix, boxes.T))
        inside = _box_mask(boxes.T, height, width)[:, None]
        mirror = images.flip(0)
        weight = lam.view(n, 1, 1, 1).to(images.dtype)
        blended = images * weight + mirror * (1.0 - weight)
        mixed = torch.where(cutmix.view(n, 1, 1, 1), torch.where(inside, mirror, images), blended)
        return mixed, self._targets(labels, lam)

    def _draw(self, units: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(lambda, whether CutMix) per unit; lambda 1 for a unit left unmixed."""
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cutmix = torch.rand(units, device=device) < self.switch_prob
            alpha = torch.where(cutmix, self.cutmix_alpha, self.mixup_alpha)
        else:
            cutmix = torch.full((units,), self.cutmix_alpha > 0, device=device)
            alpha = torch.full((units,), max(self.mixup_alpha, self.cutmix_alpha), device=device)
        # Beta(alpha, alpha) as X / (X + Y) of two Gamma(alpha) draws (torch.distributions.Beta's way).
        gamma = torch._standard_gamma(alpha[:, None].expand(units, 2).contiguous())
        lam = gamma[:, 0] / gamma.sum(dim=1)
        mixed = torch.rand(units, device=device) < self.prob
        return torch.where(mixed, lam, torch.ones_like(lam)), cutmix & mixed

    def _per_image(self, values: torch.Tensor, n: int) -> torch.Tensor:
        """Per-unit ``values`` (first dimension) for each of the n images: a pair's two images share theirs."""
        if self.mode == "batch":
            return values.expand(n, *values.shape[1:])
        if self.mode == "pair":
            return torch.cat([values, values.flip(0)])
        return values

    def _targets(self, labels: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """timm's ``mixup_target``: smoothed one-hot targets blended with the mirror's by lambda."""
        off = self.label_smoothing / self.num_classes
        on = 1.0 - self.label_smoothing + off
        one_hot = torch.full((len(labels), self.num_classes), off, device=labels.device)
        one_hot = one_hot.scatter(1, labels.long().view(-1, 1), on)
        weight = lam.view(-1, 1).float()
        return one_hot * weight + one_hot.flip(0) * (1.0 - weight)


def _boxes(lam: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """timm's ``rand_bbox``: per lambda a box of sides ``sqrt(1 - lam)`` of the image's, centred at a
    uniform pixel and clipped by the border; rows (top, bottom, left, right) of integer tensors."""
    ratio = (1.0 - lam).clamp_min(0.0).sqrt()
    sides = []
    for size in (height, width):
        cut = (size * ratio).long()
        centre = torch.randint(0, size, lam.shape, device=lam.device)
        sides += [(centre - cut // 2).clamp(0, size), (centre + (cut + 1) // 2).clamp(0, size)]
    return torch.stack(sides)


def _box_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """N x H x W bool: inside each image's box (rows top, bottom, left, right of ``boxes``)."""
    top, bottom, left, right = (b[:, None] for b in boxes)
    rows = torch.arange(height, device=boxes.device)
    columns = torch.arange(width, device=boxes.device)
    return (((rows >= top) & (rows < bottom))[:, :, None]) & (((columns >= left) & (columns < right))[:, None, :])
