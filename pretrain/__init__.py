"""vitscale pre-training: config, data streams, models, objectives, the DeepSpeed engine and the loop."""

from pathlib import Path

__version__ = "0.1.0"

# Recipes live beside the packages (an editable install or a checkout).
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEMO_RECIPE = CONFIGS / "pretrain" / "demo.yaml"
