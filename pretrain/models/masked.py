"""Masked image modeling inside a plain timm backbone: a learned mask token replaces the patch
embeddings of masked patches, and the backbone returns its final, unpooled tokens (SimMIM, DINOv2's
iBOT loss).

:func:`accept_masks` gives a backbone a forward that takes the mask as an argument: timm's
``forward_features`` written out with the mask token applied after the patch embedding. The mask
then reaches the backbone as a tensor in its own call, with no hook or Python state between calls,
so a compiled step traces it like any other input. The backbone is still called as a module, so
everything timm and DeepSpeed attach to its call (ZeRO-3 gathering the parameters it holds itself,
such as ViT's position embedding) stays in place; its weights stay the plain timm model's, which is
what is exported.
"""

from __future__ import annotations

import types
from typing import Literal

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models import checkpoint_seq
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2
from timm.models.vision_transformer import VisionTransformer

# How the mask token starts: "normal" (std 0.02, cut at +-2: timm's trunc_normal_, as SimMIM's Swin),
# "normal_within_std" (std 0.02, cut at +-0.02: BEiT's, as SimMIM's ViT), "zeros" (DINOv2's).
MaskTokenInit = Literal["normal", "normal_within_std", "zeros"]

# Backbones whose forward_features is patch_embed -> layers -> norm (timm's Swin V1 and V2).
STAGED = (SwinTransformer, SwinTransformerV2)


class MaskToken(nn.Module):
    """The learned token that replaces masked patch embeddings (a module of its own so that ZeRO-3
    gathers it when it is called)."""

    def __init__(self, dim: int, init: MaskTokenInit = "normal") -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim))
        if init == "normal":
            trunc_normal_(self.token, std=0.02)
        elif init == "normal_within_std":
            trunc_normal_(self.token, std=0.02, a=-0.02, b=0.02)
        elif init != "zeros":
            raise ValueError(f"init={init!r}: expected one of {MaskTokenInit.__args__}")

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``tokens``: N x L x C (ViT) or N x H x W x C (Swin, ViT with dynamic sizes); ``mask``: N x H x W."""
        weight = mask.reshape(*tokens.shape[:-1], 1).to(tokens.dtype)
        return tokens * (1.0 - weight) + self.token.to(tokens.dtype) * weight

    def no_weight_decay(self) -> set[str]:
        return {"token"}  # as the official SimMIM and DINOv2 exempt their mask tokens


def accepts_masks(encoder: nn.Module) -> bool:
    return isinstance(encoder, (VisionTransformer, *STAGED))


def accept_masks(encoder: nn.Module) -> None:
    """Make ``encoder(images, mask_token=None, mask=None, unpooled=False)`` work: with ``mask_token``
    and ``mask`` (N x H x W on the patch grid, 1 where masked) its patch embeddings are masked;
    with ``unpooled`` it returns its final norm's tokens instead of its pooled output. Called with
    the image alone it is timm's forward. Only the forward of this instance changes (as
    pretrain.models.pos_embed changes ViT's ``_pos_embed``)."""
    if not accepts_masks(encoder):
        raise ValueError(f"{type(encoder).__name__}: masked forward written for timm's VisionTransformer and "
                         f"SwinTransformer (V1, V2) only")
    encoder.forward = types.MethodType(_forward, encoder)


def _forward(self: nn.Module, images: torch.Tensor, mask_token: MaskToken | None = None,
             mask: torch.Tensor | None = None, unpooled: bool = False) -> torch.Tensor:
    if mask_token is None and not unpooled:
        return type(self).forward(self, images)
    features = _masked_features(self, images, mask_token, mask)
    return features if unpooled else self.forward_head(features)


def _masked_features(encoder: nn.Module, images: torch.Tensor, mask_token: MaskToken | None,
                    mask: torch.Tensor | None) -> torch.Tensor:
    """timm's ``forward_features`` of ``encoder`` (timm 1.0's ViT and Swin) with the patch
    embeddings masked after the patch embedding (and its norm), before ViT's position embedding and
    class token."""
    x = encoder.patch_embed(images)
    if mask_token is not None:
        x = mask_token(x, mask)
    if isinstance(encoder, STAGED):
        return encoder.norm(encoder.layers(x))
    x = encoder.norm_pre(encoder.patch_drop(encoder._pos_embed(x)))
    if encoder.grad_checkpointing and not torch.jit.is_scripting():
        x = checkpoint_seq(encoder.blocks, x)
    else:
        x = encoder.blocks(x)
    return encoder.norm(x)
