"""Masked image modeling inside a plain timm backbone: a learned mask token replaces the patch
embeddings of masked patches, and the backbone returns its final, unpooled tokens (SimMIM, DINOv2's
iBOT loss).

Both enter the backbone's own forward through hooks (on its patch embedding, its final norm and
itself), so that everything timm and DeepSpeed attach to that forward (ZeRO-3 gathering the
model's own parameters, such as ViT's position embedding; activation checkpointing) stays in place,
and the backbone stays the plain timm model that is exported.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

# How the mask token starts: "normal" (std 0.02, cut at +-2: timm's trunc_normal_, as SimMIM's Swin),
# "normal_within_std" (std 0.02, cut at +-0.02: BEiT's, as SimMIM's ViT), "zeros" (DINOv2's).
MaskTokenInit = Literal["normal", "normal_within_std", "zeros"]


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


@contextmanager
def unpooled(encoder: nn.Module, mask_token: MaskToken | None = None, mask: torch.Tensor | None = None):
    """While open, ``encoder(images)`` returns its final, unpooled tokens (its final norm's output)
    instead of its pooled output; with ``mask_token`` and ``mask`` (N x H x W on the patch grid, 1
    where masked) its patch embeddings are masked first."""
    features: list[torch.Tensor] = []
    hooks = [encoder.norm.register_forward_hook(lambda _m, _i, out: features.append(out)),
             # First of the encoder's hooks: ZeRO-3's own hook must see the tensor the loss uses,
             # or the parameters the encoder holds itself (ViT's position embedding and class
             # token) are not gathered again for the backward pass.
             encoder.register_forward_hook(lambda _m, _i, _out: features.pop(), prepend=True)]
    if mask_token is not None:
        hooks.append(encoder.patch_embed.register_forward_hook(lambda _m, _i, out: mask_token(out, mask)))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
