"""vitscale pre-training: config, data streams, models, objectives, the DeepSpeed engine and the loop."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__version__ = "0.1.0"

# The recipes ship as package data (pretrain/configs, a link to the top-level configs/ in a checkout),
# so they are found the same way in a checkout, an editable install and a wheel. Installs unpack
# onto the file system, which ``base:`` chains (paths relative to a recipe) rely on.
CONFIGS = Path(str(files("pretrain") / "configs"))
DEMO_RECIPE = CONFIGS / "pretrain" / "demo.yaml"


def recipe_path(name: str | Path) -> Path:
    """``name`` as a path when it exists; else a shipped recipe when it reads ``configs/...``
    (so the README's commands work from any directory after a wheel install); else ``name``."""
    path = Path(name).expanduser()
    if path.exists() or path.is_absolute() or not path.parts or path.parts[0] != "configs":
        return path
    shipped = CONFIGS.joinpath(*path.parts[1:])
    return shipped if shipped.exists() else path
