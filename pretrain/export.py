"""The export format: a backbone's weights in ``backbone.safetensors`` (timm state-dict keys) and how
to build it in ``backbone.json`` (timm model name, kwargs, the weights' file name, and facts such as
the step and objective). Written at the end of a run into ``RUN_DIR/export``; this module is its one
writer and its one reader.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from pretrain.files import atomic_path, atomic_write

WEIGHTS_NAME = "backbone.safetensors"
META_NAME = "backbone.json"


class ExportError(ValueError):
    """An export whose weights cannot be read; the message names the file."""


def export_backbone(state_dict: dict[str, torch.Tensor], out_dir: str | Path, model_name: str,
                    model_kwargs: dict, extra: dict | None = None) -> Path:
    """Write ``backbone.safetensors`` (timm state-dict format) and ``backbone.json`` (how to build it)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_NAME
    with atomic_path(weights) as tmp:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata={"model": model_name})
    meta = {"model": model_name, "kwargs": model_kwargs, "weights": weights.name, **(extra or {})}
    atomic_write(out_dir / META_NAME, json.dumps(meta, indent=1).encode())
    return weights


def find_export(path: str | Path, name: str = META_NAME) -> Path | None:
    """The export directory at ``path``: itself or, for a run dir, its ``export``; None when neither
    holds the file ``name``."""
    path = Path(path).expanduser()
    return next((d for d in (path, path / "export") if (d / name).is_file()), None)


def read_meta(export_dir: str | Path) -> dict:
    """``backbone.json``: ``model`` (timm name), ``kwargs``, ``weights`` (file name) and the facts saved with it."""
    return json.loads((Path(export_dir) / META_NAME).read_text())


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (an export's weights, or any such file); ExportError naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise ExportError(f"{path}: not a readable safetensors file: {e}") from None


def load_export(export_dir: str | Path) -> nn.Module:
    """The exported backbone: the timm model ``backbone.json`` describes, with the exported weights."""
    import timm

    meta = read_meta(export_dir)
    model = timm.create_model(meta["model"], pretrained=False, **meta["kwargs"])
    model.load_state_dict(read_weights(Path(export_dir) / meta["weights"]))
    return model
