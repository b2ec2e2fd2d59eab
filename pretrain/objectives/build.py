"""Building the objective ``objective.name`` selects (:data:`pretrain.objectives.OBJECTIVES`).

Above the objectives' modules, which all import :mod:`pretrain.objectives.base`: the table-driven
construction lives here rather than in base, so that base imports none of them.
"""

from __future__ import annotations

import importlib

import torch

from pretrain.objectives import OBJECTIVES
from pretrain.objectives.base import Objective, RunContext
from pretrain.sections import Config, ConfigError


def build_objective(cfg: Config, ctx: RunContext) -> Objective:
    """The objective ``objective.name`` selects."""
    return importlib.import_module(OBJECTIVES[cfg.objective.name]).Objective(cfg, ctx)


def check_model_inputs(cfg: Config, ctx: RunContext) -> None:
    """Build the objective on the meta device (no memory, no arithmetic) and pass its backbone an
    input of every size its training view makes, so that model kwargs timm refuses and image sizes
    the model cannot take fail here, naming the keys, before any process starts."""
    import io

    from PIL import Image

    from pretrain.data.decode import decode
    from pretrain.models.backbone import on_meta_device

    model = f"model.name={cfg.model.name!r}, model.kwargs={cfg.model.kwargs}"
    try:
        objective = on_meta_device(lambda: build_objective(cfg, ctx))
    except ConfigError:
        raise
    except Exception as e:  # timm's own checks: TypeError, AssertionError, ValueError, ...
        raise ConfigError(f"{model}: cannot be built: {type(e).__name__}: {e}") from None
    backbone = objective.backbone()
    size = cfg.data.image_size
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
    if patch is not None and any(size % p for p in patch):
        raise ConfigError(f"data.image_size={size}: not a multiple of the patch size {tuple(patch)} of {model}")
    view = objective.train_view()
    encoded = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(encoded, "JPEG")
    image, _ = decode({"__key__": "check", "jpg": encoded.getvalue(), "cls": b"0"},
                      lazy=bool(getattr(view, "decodes_itself", False)))
    sizes = sorted({tuple(v.shape[-2:]) for v in view(image).values() if torch.is_tensor(v) and v.ndim >= 3})
    for height, width in sizes:
        try:
            with torch.no_grad():
                backbone(torch.empty(1, 3, height, width, device="meta"))
        except NotImplementedError:  # an operation without a meta kernel: nothing learned, not an error
            return
        except Exception as e:
            raise ConfigError(f"{_size_keys(cfg, height, width)}: {model} cannot take {height}x{width} inputs: "
                              f"{type(e).__name__}: {e}") from None


def _size_keys(cfg: Config, height: int, width: int) -> str:
    """The config keys that make training views of this size (data.image_size, objective.*_size)."""
    import dataclasses

    keys = [f"data.image_size={cfg.data.image_size}"] if (height, width) == (cfg.data.image_size,) * 2 else []
    keys += [f"objective.{f.name}={height}" for f in dataclasses.fields(cfg.objective)
             if f.name.endswith("size") and getattr(cfg.objective, f.name) == height == width]
    return ", ".join(keys) or f"a {height}x{width} view of objective.name={cfg.objective.name!r}"
