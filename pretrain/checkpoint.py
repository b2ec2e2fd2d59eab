"""The error every reader and writer of checkpoints raises, and the backbone's export.

The checkpoints themselves (their layout on disk, what goes into them, resuming) are
:mod:`pretrain.state`; the engine's own shards are :mod:`pretrain.engine.checkpoint_io`. The error
lives here, below both, because both raise it: a module that imports neither.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from pretrain.files import atomic_path, atomic_write


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or must not be loaded; the message names the file."""


def export_backbone(state_dict: dict[str, torch.Tensor], out_dir: str | Path, model_name: str,
                    model_kwargs: dict, extra: dict | None = None) -> Path:
    """Write ``backbone.safetensors`` (timm state-dict format) and ``backbone.json`` (how to build it)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "backbone.safetensors"
    with atomic_path(weights) as tmp:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata={"model": model_name})
    meta = {"model": model_name, "kwargs": model_kwargs, "weights": weights.name, **(extra or {})}
    atomic_write(out_dir / "backbone.json", json.dumps(meta, indent=1).encode())
    return weights
