"""Learning check: a short MoBY run (tiny Swin) on the digits lifts a logistic-regression probe on
frozen features clearly above the same model at random initialization. DINO's (tiny ViT) is the
demo's own check, through `python -m pretrain` itself: tests/integration/test_demo.py."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_SWIN, run_module
from pretrain.config import load_config
from pretrain.models.backbone import create_backbone
from pretrain.export import load_export
from pretrain.probe import probe_accuracy

pytestmark = pytest.mark.slow

COMMON = ["run.threads=1", "train.progress=false", "data.workers=0", "data.batch_size=64", "train.ckpt_every=0"]
MOBY = ["objective.name=moby", *TINY_SWIN, "objective.proj_dim=64", "objective.hidden_dim=256",
        "objective.queue_size=512", "optim.lr=0.002", "train.steps=150",
        # Weak views, as the demo's: crops of 30% of an upscaled 8x8 digit plus colour jitter leave two
        # views too little in common (docs/demo.md); with them the probe gained 5.8 points, with these 13.4.
        "objective.scale=[0.6,1.0]", "objective.jitter=0", "objective.grayscale=0",
        "data.image_size=32", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]", "model.drop_path=0",
        "engine.precision=fp32", "optim.warmup_steps=15", "train.clip_grad=3.0", "objective.hflip=0"]


def test_moby_lifts_a_linear_probe(tmp_path, digits_dir):
    overrides = [f"data.train={digits_dir}", f"run.dir={tmp_path}", *COMMON, *MOBY]
    run_module("pretrain", *overrides)
    torch.set_num_threads(1)
    trained = probe_accuracy(load_export(tmp_path / "export"), str(digits_dir), 32, (0.5,) * 3, (0.5,) * 3)
    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.run.seed)  # the trainer's initial weights
    random_init = create_backbone(cfg.model, 32, 0)
    baseline = probe_accuracy(random_init, str(digits_dir), 32, (0.5,) * 3, (0.5,) * 3)
    # The random init's probe moves by about 9 points between seeds (49.6% here, 58.2% with run.seed=1,
    # where the same run gained 3.1): the bar is the measured gain less that spread's half.
    assert trained > baseline + 0.08, f"moby: probe {trained:.3f} after pre-training, {baseline:.3f} at init"
