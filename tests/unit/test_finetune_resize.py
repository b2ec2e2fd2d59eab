"""Resolution change: a model resized by finetune's loading equals timm's own resize path."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from timm.models.swin_transformer import checkpoint_filter_fn

from finetune import weights
from finetune.resize import adapt

VIT = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "num_classes": 10}
SWIN = {"patch_size": 2, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "num_classes": 10}


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial position tables (timm initializes some of them to zero)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos" in name:
                p.normal_(std=0.5)
    return model.eval()


def test_vit_position_embedding_resampled_like_set_input_size(tmp_path):
    torch.manual_seed(0)
    small = _perturbed(timm.create_model("vit_tiny_patch16_224", img_size=32, **VIT))
    torch.save(small.state_dict(), tmp_path / "vit.pth")
    by_timm = copy.deepcopy(small)
    by_timm.set_input_size(img_size=(48, 48))
    large = timm.create_model("vit_tiny_patch16_224", img_size=48, **VIT).eval()
    weights.load_into(large, tmp_path / "vit.pth", head="keep")
    assert large.pos_embed.shape == (1, 1 + 12 * 12, 32)
    torch.testing.assert_close(large.pos_embed, by_timm.pos_embed)
    images = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(large(images), by_timm(images))


def test_swin_window_change_like_set_input_size(tmp_path):
    # 32 px / window 4 -> 48 px / window 6: the same change as 224 / window 7 -> 384 / window 12.
    torch.manual_seed(0)
    small = _perturbed(timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4, **SWIN))
    torch.save(small.state_dict(), tmp_path / "swin.pth")
    by_timm = copy.deepcopy(small)
    by_timm.set_input_size(img_size=(48, 48), window_size=6)
    large = timm.create_model("swin_tiny_patch4_window7_224", img_size=48, window_size=6, **SWIN).eval()
    weights.load_into(large, tmp_path / "swin.pth", head="keep")
    table = "layers.0.blocks.0.attn.relative_position_bias_table"
    assert large.state_dict()[table].shape == (11 * 11, 1)
    torch.testing.assert_close(large.state_dict()[table], by_timm.state_dict()[table])
    images = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(large(images), by_timm(images))


def test_swin_matches_checkpoint_filter_fn_on_a_raw_checkpoint(tmp_path):
    torch.manual_seed(0)
    small = _perturbed(timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4, **SWIN))
    state = small.state_dict()
    torch.save({"model": state}, tmp_path / "swin.pth")
    large = timm.create_model("swin_tiny_patch4_window7_224", img_size=48, window_size=6, **SWIN).eval()
    reference = copy.deepcopy(large)
    # The state dict itself: timm before 1.0.31 looks for the timm layout's classifier before it unwraps "model".
    reference.load_state_dict(checkpoint_filter_fn(state, reference))
    weights.load_into(large, tmp_path / "swin.pth", head="keep")
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(large.state_dict()[key], value, msg=key)


def test_swin_bicubic_relpos_tables_as_the_official_code(tmp_path):
    """finetune.relpos_interpolation=bicubic: each (2w-1)^2 x heads table interpolated as a heads x
    (2w-1) x (2w-1) image (Swin's utils.load_pretrained), on a raw official-layout checkpoint; the
    geometric default gives other tables."""
    torch.manual_seed(0)
    small = _perturbed(timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4, **SWIN))
    torch.save({"model": small.state_dict()}, tmp_path / "swin.pth")
    bicubic = timm.create_model("swin_tiny_patch4_window7_224", img_size=48, window_size=6, **SWIN).eval()
    geometric = copy.deepcopy(bicubic)
    weights.load_into(bicubic, tmp_path / "swin.pth", head="keep", relpos_interpolation="bicubic")
    weights.load_into(geometric, tmp_path / "swin.pth", head="keep")
    for name, table in small.state_dict().items():
        if not name.endswith("relative_position_bias_table"):
            continue
        heads = table.shape[1]
        official = torch.nn.functional.interpolate(table.permute(1, 0).view(1, heads, 7, 7), size=(11, 11),
                                                   mode="bicubic").view(heads, 121).permute(1, 0)
        torch.testing.assert_close(bicubic.state_dict()[name], official, msg=name)
        assert (geometric.state_dict()[name] - official).abs().max() > 1e-3, name
    assert torch.isfinite(bicubic(torch.randn(2, 3, 48, 48))).all()


def test_a_headless_swin_keeps_its_layout():
    """A Swin backbone without classifier (DINO, MoBY) in timm's layout: resized, stages not renamed."""
    torch.manual_seed(0)
    headless = {**SWIN, "num_classes": 0}
    small = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4, **headless)
    large = timm.create_model("swin_tiny_patch4_window7_224", img_size=48, window_size=6, **headless)
    adapted = adapt(small.state_dict(), large)
    assert "head.fc.weight" not in adapted and "layers.1.downsample.reduction.weight" in adapted
    large.load_state_dict(adapted)  # strict: every key where the model has it


def test_vit_pretrained_on_its_class_token_fine_tunes_on_pooled_tokens(tmp_path):
    """SimMIM's and BEiT's protocol: pre-trained with a final norm on the class token, fine-tuned on
    average-pooled tokens with a fresh norm of its own; every other weight loads."""
    torch.manual_seed(0)
    pretrained = _perturbed(timm.create_model("vit_tiny_patch16_224", img_size=32, **VIT))
    with torch.no_grad():
        pretrained.norm.weight.fill_(3.0)
    torch.save(pretrained.state_dict(), tmp_path / "vit.pth")
    pooled = timm.create_model("vit_tiny_patch16_224", img_size=32, global_pool="avg", **VIT).eval()
    weights.load_into(pooled, tmp_path / "vit.pth", head="keep")
    assert isinstance(pooled.norm, torch.nn.Identity)
    torch.testing.assert_close(pooled.fc_norm.weight, torch.ones(32))
    for key, value in pretrained.state_dict().items():
        if not key.startswith("norm."):
            torch.testing.assert_close(pooled.state_dict()[key], value)
    with pytest.raises(weights.WeightsError, match="norm"):  # the other way round is not guessed
        torch.save(pooled.state_dict(), tmp_path / "pooled.pth")
        weights.load_into(timm.create_model("vit_tiny_patch16_224", img_size=32, **VIT), tmp_path / "pooled.pth")


def _official_geometric_table(table: torch.Tensor, new_side: int) -> torch.Tensor:
    """SimMIM's remap_pretrained_keys_swin, written from its description: the stored positions are
    spread on a geometric progression (ratio q found by bisection so that its half reaches
    new_side // 2) and each head's grid is fitted by a cubic interpolating spline (scipy's interp2d
    kind=cubic on a grid is this s=0 bicubic spline), then sampled at the integer offsets."""
    import numpy as np
    from scipy.interpolate import RectBivariateSpline

    side = math.isqrt(table.shape[0])
    low, high = 1.01, 1.5
    while high - low > 1e-6:
        q = (low + high) / 2
        if (1 - q ** (side // 2)) / (1 - q) > new_side // 2:
            high = q
        else:
            low = q
    offsets, position = [], 1.0
    for i in range(side // 2):
        offsets.append(position)
        position += q ** (i + 1)
    grid = np.array([-d for d in reversed(offsets)] + [0.0] + offsets)
    targets = np.arange(-(new_side // 2), new_side // 2 + 0.1, 1.0)
    heads = [RectBivariateSpline(grid, grid, table[:, h].reshape(side, side).double().numpy(), kx=3, ky=3, s=0)
             (targets, targets) for h in range(table.shape[1])]
    return torch.tensor(np.stack([h.reshape(-1) for h in heads], axis=1), dtype=torch.float32)


@pytest.mark.parametrize("interpolation, within", [("geometric", 0.01), ("bicubic", None)])
def test_swin_tables_against_simmim_geometric_formula(tmp_path, interpolation, within):
    """SimMIM's fine-tuning (window 6 -> 7: 11x11 -> 13x13 tables): "geometric" follows the official
    formula on a smooth table, plain bicubic interpolation does not."""
    kwargs = {**SWIN, "depths": [1], "num_heads": [2]}
    small = timm.create_model("swin_tiny_patch4_window7_224", img_size=48, window_size=6, **kwargs)
    key = "layers.0.blocks.0.attn.relative_position_bias_table"
    offsets = torch.arange(-5.0, 6.0)
    smooth = torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / 18.0)  # a smooth 11x11 bump
    state = {k: v for k, v in small.state_dict().items()}
    state[key] = torch.stack([smooth.reshape(-1), -2 * smooth.reshape(-1)], dim=1)
    large = timm.create_model("swin_tiny_patch4_window7_224", img_size=56, window_size=7, **kwargs)
    resized = adapt(state, large, interpolation)[key]
    official = _official_geometric_table(state[key], 13)
    rms = (resized - official).pow(2).mean().sqrt().item()
    if within is None:
        assert rms > 0.05, rms  # the check can fail: bicubic is far from the official table
    else:
        assert rms < within, rms
