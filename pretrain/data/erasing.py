"""Random erasing (Zhong et al. 2020) on the device, as timm's ``RandomErasing`` computes it (one
box per image, its area a uniform share in [min_area, max_area] of the image, its aspect ratio
log-uniform, up to 10 tries for a box that fits; filled with per-pixel or per-channel normal noise,
or zeros), with every random draw a tensor on the device.

timm loops over the images on the host and cuts each box with Python slices: under torch.compile
every new box was a new graph. Here all ten tries of every image are drawn at once and the first
that fits is taken, so the whole batch is one graph with no host sync; the draws come from torch's
generator instead of Python's: the same distributions, other samples than timm's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

TRIES = 10  # timm's attempts at a box that fits inside the image


@dataclass(frozen=True)
class RandomErasing:
    probability: float
    mode: Literal["pixel", "rand", "const"] = "pixel"
    min_area: float = 0.02
    max_area: float = 1 / 3
    min_aspect: float = 0.3

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: a normalized N x C x H x W float batch; a new batch with each image's box erased."""
        n, channels, height, width = images.shape
        device = images.device
        area = torch.empty(n, TRIES, device=device).uniform_(self.min_area, self.max_area) * (height * width)
        log_aspect = torch.empty(n, TRIES, device=device).uniform_(math.log(self.min_aspect),
                                                                   -math.log(self.min_aspect))
        aspect = log_aspect.exp()
        box_height = (area * aspect).sqrt().round().long()
        box_width = (area / aspect).sqrt().round().long()
        fits = (box_height < height) & (box_width < width)
        first = fits.int().argmax(dim=1, keepdim=True)  # the first try that fits (argmax takes the first)
        box_height, box_width = box_height.gather(1, first)[:, 0], box_width.gather(1, first)[:, 0]
        erased = (torch.rand(n, device=device) < self.probability) & fits.any(dim=1)
        top = (torch.rand(n, device=device) * (height - box_height + 1)).long()
        left = (torch.rand(n, device=device) * (width - box_width + 1)).long()
        rows = torch.arange(height, device=device)[None, :]
        columns = torch.arange(width, device=device)[None, :]
        inside = (((rows >= top[:, None]) & (rows < (top + box_height)[:, None]))[:, :, None] &
                  ((columns >= left[:, None]) & (columns < (left + box_width)[:, None]))[:, None, :])
        inside = (inside & erased[:, None, None])[:, None]
        return torch.where(inside, self._fill(images), images)

    def _fill(self, images: torch.Tensor) -> torch.Tensor:
        if self.mode == "pixel":
            return torch.randn_like(images)
        if self.mode == "rand":
            return torch.randn(*images.shape[:2], 1, 1, device=images.device, dtype=images.dtype)
        return torch.zeros((), device=images.device, dtype=images.dtype)
