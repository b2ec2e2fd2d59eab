"""Learning checks for the demo recipes of DINOv2 and SimMIM: a run of the recipe on the digits
(one process at the recipe's global batch) lifts a logistic-regression probe on frozen features
clearly above the same model at random initialization; SimMIM's masked-pixel loss falls below the
best constant prediction, and its export is the plain timm backbone."""

from __future__ import annotations

import json

import pytest
import torch

from pretrain.config import load_config
from pretrain.export import load_export
from pretrain.models.backbone import create_backbone
from pretrain.probe import probe_accuracy
from tests.conftest import REPO, load_export as load_timm_export, run_module

pytestmark = pytest.mark.slow

# Measured (torch 2.14.1, seeds 0 and 1): DINOv2 74.1% / 71.3% against 49.6% / 50.4% at random init;
# SimMIM 66.6% / 68.2% against 49.6% / 50.4% (masked modelling probes worse linearly than DINO-style
# objectives, as its paper says). The bars leave room for another torch's rounding.
LIFT = {"dinov2_demo": 0.12, "simmim_demo": 0.08}


@pytest.mark.parametrize("recipe", sorted(LIFT))
def test_demo_recipe_lifts_a_linear_probe(recipe, tmp_path, digits_dir):
    path = str(REPO / "configs/pretrain" / f"{recipe}.yaml")
    overrides = [f"data.train={digits_dir}", "data.prepare=none", f"run.dir={tmp_path}", "run.threads=1",
                 "train.progress=false", "data.workers=0", "data.batch_size=64", "train.ckpt_every=0"]
    run_module("pretrain", path, *overrides)
    cfg = load_config(path, overrides)
    size, mean, std = cfg.data.image_size, cfg.data.mean, cfg.data.std
    torch.set_num_threads(1)
    trained = probe_accuracy(load_export(tmp_path / "export"), str(digits_dir), size, mean, std)
    torch.manual_seed(cfg.run.seed)  # the trainer's initial weights
    baseline = probe_accuracy(create_backbone(cfg.model, size, 0), str(digits_dir), size, mean, std)
    assert trained > baseline + LIFT[recipe], f"{recipe}: probe {trained:.3f} after pre-training, {baseline:.3f} at init"
    if recipe == "simmim_demo":
        logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        masked = [values["train/recon_masked"] for values in logged if "train/recon_masked" in values]
        # Predicting every pixel as the images' median (the best constant for an L1 loss) scores 0.55
        # on these digits; the model gets below that, not only below its own start (about 0.63).
        assert masked[-1] < 0.5 and masked[-1] < 0.75 * masked[0], masked
        meta, weights, model = load_timm_export(tmp_path)
        assert meta["objective"] == "simmim"
        assert not any("mask_token" in k or k.startswith("decoder") for k in weights)
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
