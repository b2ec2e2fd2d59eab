"""Weights trained at one resolution fitted to a model built at another, the way timm does it.

ViT: the absolute position embedding is resampled (bicubic, antialiased) from the stored grid to the
model's grid, prefix tokens kept, as ``VisionTransformer.set_input_size`` does; a patch-embedding
kernel of another size is resampled too. Swin: timm's own ``checkpoint_filter_fn`` drops the
relative-position index and attention-mask buffers, interpolates every relative-position bias table
to the model's window (224/window 7 -> 384/window 12) and renames the official checkpoints' layout.
The tables are resampled either by timm's geometric method (``geometric``) or, as the official Swin
code's ``load_pretrained`` does, by plain bicubic interpolation of the (2w-1) x (2w-1) grid
(``bicubic``): the two give different tables.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer import checkpoint_filter_fn as swin_filter
from timm.models.vision_transformer import VisionTransformer


RELPOS_INTERPOLATIONS = ("geometric", "bicubic")


def adapt(state: dict[str, torch.Tensor], model: nn.Module,
          relpos_interpolation: str = "geometric") -> dict[str, torch.Tensor]:
    """``state`` with its resolution-dependent tensors reshaped for ``model``; ``relpos_interpolation``
    picks how Swin's relative-position bias tables are resampled to a new window."""
    if relpos_interpolation not in RELPOS_INTERPOLATIONS:
        raise ValueError(f"relpos_interpolation={relpos_interpolation!r}: expected one of {RELPOS_INTERPOLATIONS}")
    if isinstance(model, SwinTransformer):
        state = dict(state)
        if relpos_interpolation == "bicubic":
            state = _bicubic_relpos_tables(state, model)  # then timm's filter finds them fitting and keeps them
        return _adapt_swin(state, model)
    if isinstance(model, VisionTransformer):
        return _adapt_vit(state, model)
    return dict(state)


# timm before 1.0.31 tells the official layout from its own by the absence of "head.fc.weight", so
# it renamed the stages of a headless timm state dict (a DINO or MoBY backbone); newer timm looks for
# the official layout's first-stage downsample, as here. A stand-in classifier key keeps older timm
# from renaming a timm-layout dict; it is dropped again.
_TIMM_LAYOUT_MARKER = "head.fc.weight"


def _adapt_swin(state: dict[str, torch.Tensor], model: SwinTransformer) -> dict[str, torch.Tensor]:
    official = "layers.0.downsample.reduction.weight" in state
    if official or _TIMM_LAYOUT_MARKER in state:
        return swin_filter(dict(state), model)
    out = swin_filter({**state, _TIMM_LAYOUT_MARKER: torch.empty(0)}, model)
    del out[_TIMM_LAYOUT_MARKER]
    return out


def _adapt_vit(state: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    out = dict(state)
    pools_with_fc_norm = isinstance(model.norm, nn.Identity) and not isinstance(model.fc_norm, nn.Identity)
    if pools_with_fc_norm and "norm.weight" in out and "fc_norm.weight" not in out:
        # Fine-tuning on pooled tokens a model pre-trained on its class token (BEiT, SimMIM, MAE): the
        # final norm is dropped and the pooled tokens' norm starts fresh, as those codes do.
        for key in [k for k in out if k.startswith("norm.")]:
            out["fc_" + key] = getattr(model.fc_norm, key.removeprefix("norm.")).detach().clone()
            del out[key]
    kernel = out.get("patch_embed.proj.weight")
    target = model.patch_embed.proj.weight.shape[-2:]
    if kernel is not None and kernel.ndim == 4 and kernel.shape[-2:] != target:
        out["patch_embed.proj.weight"] = resample_patch_embed(kernel, list(target), interpolation="bicubic",
                                                              antialias=True, verbose=False)
    pos = out.get("pos_embed")
    if pos is not None and model.pos_embed is not None and pos.shape != model.pos_embed.shape:
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        side = math.isqrt(pos.shape[1] - prefix)
        if side * side != pos.shape[1] - prefix:
            raise ValueError(f"pos_embed: {pos.shape[1] - prefix} patch positions do not form a square grid")
        out["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(model.patch_embed.grid_size),
                                                  old_size=[side, side], num_prefix_tokens=prefix, verbose=False)
    return out


def _bicubic_relpos_tables(state: dict[str, torch.Tensor], model: SwinTransformer) -> dict[str, torch.Tensor]:
    """Each relative-position bias table of another size than the model's, bicubically interpolated
    as a (heads, 2w-1, 2w-1) image to the model's grid (the official Swin ``load_pretrained``)."""
    expected = model.state_dict()
    out = dict(state)
    for key, table in state.items():
        if not key.endswith("relative_position_bias_table") or key not in expected:
            continue
        (length, heads), (new_length, new_heads) = table.shape, expected[key].shape
        side, new_side = math.isqrt(length), math.isqrt(new_length)
        if heads != new_heads or length == new_length or side * side != length or new_side * new_side != new_length:
            continue  # left to timm's filter, or reported by the shape check
        grid = table.float().permute(1, 0).reshape(1, heads, side, side)
        resized = F.interpolate(grid, size=(new_side, new_side), mode="bicubic")
        out[key] = resized.reshape(heads, new_length).permute(1, 0).to(table.dtype).contiguous()
    return out
