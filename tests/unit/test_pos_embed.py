"""model.pos_embed_interpolation=dino: a timm ViT fits its position embedding to a smaller input as
DINO's and DINOv2's interpolate_pos_encoding do, not as timm does."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from pretrain.config import ConfigError, ModelConfig
from pretrain.models.backbone import create_backbone

TINY = {"patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2, "dynamic_img_size": True}


def _official_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Written from DINO's VisionTransformer.prepare_tokens / interpolate_pos_encoding: the class
    token's embedding kept, the patch grid interpolated bicubically by scale factors
    (w0 + 0.1) / sqrt(N) and (h0 + 0.1) / sqrt(N), no antialiasing, added after the class token."""
    patches = model.patch_embed(images).flatten(1, 2)
    x = torch.cat([model.cls_token.expand(len(images), -1, -1), patches], dim=1)
    class_pos, patch_pos = model.pos_embed[:, 0], model.pos_embed[:, 1:]
    n = patch_pos.shape[1]
    w0 = images.shape[-1] // 4 + 0.1
    h0 = images.shape[-2] // 4 + 0.1
    grid = patch_pos.reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), -1).permute(0, 3, 1, 2)
    grid = nn.functional.interpolate(grid, scale_factor=(h0 / math.sqrt(n), w0 / math.sqrt(n)), mode="bicubic")
    patch_pos = grid.permute(0, 2, 3, 1).view(1, -1, patch_pos.shape[-1])
    return x + torch.cat([class_pos.unsqueeze(0), patch_pos], dim=1)


def _tokens(interpolation: str, images: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    cfg = ModelConfig(name="vit_tiny_patch16_224", kwargs=TINY, drop_path=0.0, pos_embed_interpolation=interpolation)
    model = create_backbone(cfg, 56, 0).eval()  # 14 x 14 patches, as ViT/16 at 224 px
    with torch.no_grad():  # a smooth embedding, as a trained one is
        rows, cols = torch.meshgrid(torch.linspace(0, 1, 14), torch.linspace(0, 1, 14), indexing="ij")
        waves = [torch.cos(math.pi * (k % 3 + 1) * rows) * torch.sin(math.pi * (k // 3 + 1) * cols / 2)
                 for k in range(16)]
        model.pos_embed[0, 1:] = torch.stack(waves, dim=-1).reshape(196, 16)
    seen = []
    model.pos_drop.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
    with torch.no_grad():
        model(images)
    return model, seen[0]


def test_local_crops_get_dinos_position_embedding():
    images = torch.randn(2, 3, 24, 24)  # 6 x 6 patches: DINO's 96-px crop of a 224-px ViT/16
    model, tokens = _tokens("dino", images)
    with torch.no_grad():
        torch.testing.assert_close(tokens, _official_tokens(model, images))
    model, timm_tokens = _tokens("timm", images)
    with torch.no_grad():
        official = _official_tokens(model, images)
        relative = (timm_tokens - official).pow(2).mean().sqrt() / official.pow(2).mean().sqrt()
    assert relative > 0.01  # the check can fail: timm's antialiased resampling is another embedding


def test_training_size_is_left_alone():
    images = torch.randn(1, 3, 56, 56)
    _, dino = _tokens("dino", images)
    _, timm_tokens = _tokens("timm", images)
    torch.testing.assert_close(dino, timm_tokens)


def test_dino_interpolation_needs_a_vit():
    with pytest.raises(ConfigError, match="model.pos_embed_interpolation"):
        ModelConfig(name="swin_tiny_patch4_window7_224", pos_embed_interpolation="dino").validate()
    cfg = ModelConfig(name="vit_tiny_patch16_224", kwargs={**TINY, "dynamic_img_size": False},
                      pos_embed_interpolation="dino")
    with pytest.raises(ConfigError, match="model.pos_embed_interpolation"):
        create_backbone(cfg, 56, 0)
