"""Backbones are timm models: any ``vit_*`` or ``swin_*`` name, built from the model config.

They keep timm's contract (``forward_features``, ``forward_head``, ``no_weight_decay``,
``group_matcher``, ``set_grad_checkpointing``), so exported weights load into ``timm.create_model``.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import timm
import torch
import torch.nn as nn
from timm.layers import set_fused_attn

from pretrain.models.pos_embed import use_dino_interpolation
from pretrain.sections import ConfigError, ModelConfig

T = TypeVar("T", bound=nn.Module)


def backbone_kwargs(cfg: ModelConfig, image_size: int, num_classes: int) -> dict:
    """The keyword arguments that rebuild this backbone with ``timm.create_model(name, **kwargs)``."""
    return {"img_size": image_size, "num_classes": num_classes, "drop_path_rate": cfg.drop_path, **cfg.kwargs}


def create_backbone(cfg: ModelConfig, image_size: int, num_classes: int) -> nn.Module:
    # timm reads the fused-attention switch when each attention layer is built; Swin's windowed
    # attention only takes the fused (scaled_dot_product_attention) path in "experimental" mode.
    set_fused_attn(cfg.fused_attn, experimental=cfg.fused_attn and cfg.name.startswith("swin"))
    kwargs = backbone_kwargs(cfg, image_size, num_classes)
    try:
        model = timm.create_model(cfg.name, pretrained=False, **kwargs)
    except (RuntimeError, ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"model.name={cfg.name!r}, model.kwargs={cfg.kwargs}: timm cannot build it "
                          f"(with img_size={image_size}, num_classes={num_classes}): {e}") from None
    if cfg.pos_embed_interpolation == "dino":
        try:
            use_dino_interpolation(model)
        except ValueError as e:
            raise ConfigError(f"model.pos_embed_interpolation=dino: {e} (model.kwargs.dynamic_img_size: true)") \
                from None
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def on_meta_device(make: Callable[[], T]) -> T:
    """``make()`` built on the meta device (no memory, no arithmetic). timm before 1.0.16 reads its
    drop-path rates with ``.item()`` while building, which the meta device refuses: there the module
    is built on the CPU and moved."""
    try:
        with torch.device("meta"):
            return make()
    except (RuntimeError, ConfigError) as e:
        if "meta tensors" not in str(e):
            raise
        return make().to("meta")
