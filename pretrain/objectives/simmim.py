"""SimMIM (Xie et al. 2022): masked image modeling by regressing the raw pixels of masked patches.

Each image is masked in square blocks of ``mask_patch_size`` pixels (32 in the paper), exactly
``ceil(mask_ratio * blocks)`` of them per image, as the official MaskGenerator draws them. The
backbone's patch embedding is replaced by a learned mask token at every masked patch (after the
patch embedding and its norm, before ViT's position embedding and class token: for Swin at the
patch level of stage 1). The backbone's final, unpooled feature map goes through a one-layer
decoder (a 1x1 convolution to ``stride**2 * 3`` channels and a pixel shuffle by the backbone's
total stride) back to the image's resolution, and the loss is the L1 distance to the normalized
input on the masked pixels only, divided by the number of masked pixels and by the channels (the
official ``SimMIM.forward``).

The backbone stays a plain timm model, which is what is exported: the mask token and the decoder
live beside it. The mask and the token enter the backbone's own call as arguments (its forward
takes them: pretrain.models.masked), so that everything timm and DeepSpeed attach to that call
(ZeRO-3 gathering the model's own parameters, such as ViT's position embedding; activation
checkpointing) stays in place, and a compiled step traces the mask like any other tensor.

The mask is drawn on the device in ``micro_step``, not in the data workers (the official code draws it
in the dataset): the trainer seeds the model-side randomness from (seed, rank, step, micro-step), so
the mask does not depend on the data pipeline's workers or position and a resumed run draws the
same masks; and the view stays the plain crop-and-flip one, which can also decode on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.data.transforms import SupervisedTrainView, normalize
from pretrain.models.backbone import create_backbone
from pretrain.models.masked import MaskToken, MaskTokenInit, accept_masks, accepts_masks
from pretrain.objectives import base
from pretrain.sections import ConfigError, ObjectiveConfig


@dataclass
class Config(ObjectiveConfig):
    name: str = "simmim"
    mask_patch_size: int = 32  # side of the square blocks masked together, in pixels
    mask_ratio: float = 0.6  # share of the blocks masked in every image
    # The view: random resized crop and flip, no colour augmentation (the official SimMIMTransform).
    scale: tuple[float, float] = (0.67, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: float = 0.5
    interpolation: Literal["bicubic", "bilinear"] = "bilinear"  # torchvision's RandomResizedCrop default
    mask_token_init: MaskTokenInit = "normal"  # pretrain.models.masked: SimMIM's ViT cuts it at +-std

    def validate(self) -> None:
        if self.mask_patch_size <= 0:
            raise ConfigError(f"objective.mask_patch_size={self.mask_patch_size!r}: must be positive")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"objective.mask_ratio={self.mask_ratio!r}: must be in (0, 1)")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ConfigError(f"objective.scale={list(self.scale)}: need 0 < min <= max <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"objective.ratio={list(self.ratio)}: need 0 < min <= max")
        if not 0.0 <= self.hflip <= 1.0:
            raise ConfigError(f"objective.hflip={self.hflip!r}: must be in [0, 1]")

    def validate_run(self, cfg) -> None:
        if cfg.data.image_size % self.mask_patch_size:
            raise ConfigError(f"objective.mask_patch_size={self.mask_patch_size}: must divide "
                              f"data.image_size={cfg.data.image_size}")


def random_block_mask(batch: int, image_size: int, mask_patch_size: int, model_patch_size: int, ratio: float,
                      device=None) -> torch.Tensor:
    """(batch, H, W) float mask on the model's patch grid, 1 where masked: per image exactly
    ``ceil(ratio * blocks)`` of the ``(image_size / mask_patch_size)**2`` blocks, chosen uniformly,
    each block covering ``mask_patch_size / model_patch_size`` patches a side."""
    side = image_size // mask_patch_size
    blocks = side * side
    count = int(math.ceil(blocks * ratio))
    order = torch.rand(batch, blocks, device=device).argsort(dim=1)
    mask = torch.zeros(batch, blocks, device=device)
    mask.scatter_(1, order[:, :count], 1.0)
    scale = mask_patch_size // model_patch_size
    return mask.view(batch, side, side).repeat_interleave(scale, 1).repeat_interleave(scale, 2)


def masked_l1(reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SimMIM's loss: the summed L1 error over the masked pixels (``mask``: N x 1 x H x W, 1 where
    masked, at pixel resolution), divided by the number of masked pixels and by the channels."""
    error = F.l1_loss(reconstruction.float(), target.float(), reduction="none")
    return (error * mask).sum() / (mask.sum() + 1e-5) / target.shape[1]


class Objective(base.Objective):
    def __init__(self, cfg, ctx: base.RunContext) -> None:
        super().__init__(cfg, ctx)
        o, model = cfg.objective, cfg.model
        self.encoder = create_backbone(model, cfg.data.image_size, 0)
        if not accepts_masks(self.encoder):
            raise ConfigError(f"model.name={model.name!r}: objective.name=simmim masks timm's ViT and Swin (V1, V2) "
                              f"backbones only")
        accept_masks(self.encoder)
        patch = self.encoder.patch_embed.patch_size
        self.patch_size = patch[0] if isinstance(patch, (tuple, list)) else patch
        if o.mask_patch_size % self.patch_size:
            raise ConfigError(f"objective.mask_patch_size={o.mask_patch_size}: must be a multiple of the patch size "
                              f"{self.patch_size} of model.name={model.name!r}, model.kwargs={model.kwargs}")
        # The total stride of the unpooled feature map: ViT's patch size, Swin's patch size * 2**(stages - 1).
        self.stride = self.encoder.feature_info[-1]["reduction"]
        self.prefix_tokens = getattr(self.encoder, "num_prefix_tokens", 0)
        self.mask_token = MaskToken(self.encoder.patch_embed.proj.out_channels, o.mask_token_init)
        self.decoder = nn.Sequential(nn.Conv2d(self.encoder.num_features, self.stride ** 2 * 3, kernel_size=1),
                                     nn.PixelShuffle(self.stride))

    def backbone(self) -> nn.Module:
        return self.encoder

    def train_view(self):
        o, d = self.cfg.objective, self.cfg.data
        return SupervisedTrainView(d.image_size, o.scale, o.ratio, o.hflip, None, 0.0, o.interpolation, d.mean)

    # -- the masked encoder ----------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The encoder's unpooled features (N x C x H/stride x W/stride) of ``images`` masked by ``mask``."""
        x = self.encoder(images, mask_token=self.mask_token, mask=mask, unpooled=True)
        if x.ndim == 3:  # ViT: N x (prefix + L) x C tokens, row-major over the patch grid
            x = x[:, self.prefix_tokens:]
            side = images.shape[-2] // self.stride
            return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, -1)
        return x.permute(0, 3, 1, 2)  # Swin: N x H x W x C

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(images, mask))

    # -- training --------------------------------------------------------------------------------------
    def micro_step(self, batch: dict):
        o, d = self.cfg.objective, self.cfg.data
        target = normalize(batch["image"], d.mean, d.std, torch.float32)
        mask = random_block_mask(len(target), target.shape[-1], o.mask_patch_size, self.patch_size, o.mask_ratio,
                                 target.device)
        reconstruction = self.reconstruct(target.to(self.ctx.compute_dtype), mask)
        pixels = mask.repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2)[:, None]
        loss = masked_l1(reconstruction, target, pixels)
        with torch.no_grad():  # how well the visible pixels are copied: a learning monitor, not trained
            visible = masked_l1(reconstruction, target, 1.0 - pixels)
        return loss, {"recon_masked": loss.detach(), "recon_visible": visible}
