"""Finetune recipes load and are checked like pre-training's; bad ones fail before any work starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.__main__ import load, main
from finetune.config import FullConfig, KnnConfig, LinearConfig
from launch.local import run as launch_local
from pretrain.config import ConfigError, load_config

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "finetune"
STAGES = {"full_demo": FullConfig, "swin_b_22k_to_1k_384": FullConfig, "simmim_swin_base_ft": FullConfig,
          "simmim_vit_base_ft": FullConfig, "linear_demo": LinearConfig,
          "dino_linear": LinearConfig, "linear_grid": LinearConfig, "knn_demo": KnnConfig, "dino_knn": KnnConfig}


def test_every_recipe_is_listed_here():
    assert sorted(p.stem for p in RECIPES.glob("*.yaml")) == sorted(STAGES)


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads(recipe, tmp_path):
    cfg = load_config(recipe, [f"pretrained={tmp_path}"], root=STAGES[recipe.stem])
    assert cfg.pretrained == str(tmp_path)


def test_full_takes_its_model_from_the_export_and_keeps_recipe_kwargs(tmp_path):
    (tmp_path / "backbone.json").write_text(json.dumps(
        {"model": "swin_tiny_patch4_window7_224", "kwargs": {"img_size": 224, "num_classes": 21841,
                                                            "embed_dim": 96, "window_size": 7}}))
    cfg = load("full", str(RECIPES / "swin_b_22k_to_1k_384.yaml"), [f"pretrained={tmp_path}"])
    assert cfg.model.name == "swin_tiny_patch4_window7_224"
    assert cfg.model.kwargs == {"embed_dim": 96, "window_size": 12}  # the recipe changes the window


def test_bad_keys_and_values_are_named(tmp_path):
    recipe = str(RECIPES / "linear_demo.yaml")
    with pytest.raises(ConfigError, match="unknown config key features.blockz; did you mean features.blocks"):
        load("linear", recipe, [f"pretrained={tmp_path}", "features.blockz=[1]"])
    with pytest.raises(ConfigError, match=r"linear.lrs=\[0.1, -1.0\]: must list positive"):
        load("linear", recipe, [f"pretrained={tmp_path}", "linear.lrs=[0.1,-1]"])
    with pytest.raises(ConfigError, match="pretrained='/no/such/run': no such file"):
        load("knn", str(RECIPES / "knn_demo.yaml"), ["pretrained=/no/such/run"])
    with pytest.raises(ConfigError, match="finetune.class_map=None: is required with finetune.head=map"):
        load("full", str(RECIPES / "full_demo.yaml"), ["finetune.head=map"])


def test_cli_and_launcher_refuse_a_bad_config_before_starting(capsys):
    assert main(["linear", str(RECIPES / "linear_demo.yaml")]) == 2
    assert "pretrained=None: is required" in capsys.readouterr().err
    # The launcher checks the finetune stage's config before it starts any process.
    assert launch_local(2, ["--", "finetune", "knn", str(RECIPES / "knn_demo.yaml"), "knn.ks=[]"]) == 2
    assert "knn.ks=[]: must list positive k" in capsys.readouterr().err
    assert launch_local(2, ["--", "finetune", "probe", str(RECIPES / "knn_demo.yaml")]) == 2
    assert "finetune needs a stage" in capsys.readouterr().err


def test_head_init_scale_scales_a_new_classifier_only(tmp_path):
    """finetune.head_init_scale (SimMIM's ViT: 0.001) multiplies the new head's initial weights."""
    import torch

    from finetune.full import FinetuneObjective
    from pretrain.dist import DistEnv
    from pretrain.objectives.base import RunContext
    from tests.conftest import TINY_VIT

    heads = {}
    for scale in (1.0, 0.001):
        cfg = load_config(None, [*TINY_VIT, "data.synthetic=true", "data.image_size=32", "data.num_classes=10",
                                 "train.steps=1", f"run.dir={tmp_path}", f"finetune.head_init_scale={scale}"],
                          FullConfig)
        torch.manual_seed(0)
        ctx = RunContext(num_classes=10, total_steps=1, steps_per_epoch=1, dist=DistEnv())
        heads[scale] = FinetuneObjective(cfg, ctx).model.get_classifier().weight.detach()
    torch.testing.assert_close(heads[0.001], heads[1.0] * 0.001)
    assert heads[1.0].abs().max() > 0
    with pytest.raises(ConfigError, match="finetune.head_init_scale"):
        load_config(None, [*TINY_VIT, "data.synthetic=true", "train.steps=1", "finetune.head=keep",
                           "finetune.head_init_scale=0.001"], FullConfig)
