"""Inputs that once escaped the checks before any process starts (issue 29, 6): each is now refused
with a message naming the key, before anything is written."""

from __future__ import annotations

import pytest
import timm

from finetune.__main__ import check as check_finetune
from pretrain.config import ConfigError, load_config
from pretrain.data.builtin import prepare
from pretrain.engine import check_deepspeed_overrides
from pretrain.export import export_backbone
from tests.conftest import REPO
from tests.helpers import synthetic_config


@pytest.mark.parametrize("held", ["a file", "other files"])
def test_prepare_refuses_a_directory_holding_something_else(tmp_path, held):
    target = tmp_path / "shards"
    if held == "a file":
        target.write_text("x")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=f"data.train='{target}': data.prepare=digits writes its shards there"):
        prepare("digits", target)
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["shards", *(["notes.txt"] if held != "a file" else [])])


def test_prepare_needs_a_directory_name():
    with pytest.raises(ConfigError, match="data.prepare='digits': needs data.train to be the directory"):
        load_config(None, ["data.prepare=digits", "data.train=''", "train.steps=1"])


@pytest.mark.parametrize("override, message", [
    ("{zero_optimization: {stage: 3}}", "engine.deepspeed.zero_optimization.stage=3: this run's is 2 "
                                        "(engine.zero_stage, on 2 processes); set engine.zero_stage instead"),
    ("{bf16: {enabled: true}}", "engine.deepspeed.bf16.enabled=True: this run's is False (engine.precision"),
    ("{fp16: {enabled: true}}", "engine.deepspeed.fp16.enabled=True: this run's is False (engine.precision"),
    ("{gradient_clipping: 1.0}", "engine.deepspeed.gradient_clipping=1.0: this run's is 0.0"),
    ("{train_micro_batch_size_per_gpu: 3}", "engine.deepspeed.train_micro_batch_size_per_gpu=3: this run's is 4"),
])
def test_engine_deepspeed_may_not_contradict_the_runs_own_keys(override, message):
    cfg = synthetic_config("engine.zero_stage=2", "engine.precision=fp32", "data.batch_size=4", "train.clip_grad=null",
                           f"engine.deepspeed={override}")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        check_deepspeed_overrides(cfg, 2)


def test_engine_deepspeed_may_repeat_the_runs_own_keys_and_set_others():
    cfg = synthetic_config("engine.zero_stage=3", "engine.precision=bf16", "data.batch_size=4",
                           "engine.deepspeed={zero_optimization: {stage: 3, stage3_param_persistence_threshold: 10}, "
                           "bf16: {enabled: true}, train_batch_size: 8}")
    check_deepspeed_overrides(cfg, 2)


def test_a_knn_probe_of_an_export_without_a_class_token_is_refused_before_it_starts(tmp_path, digits_dir):
    kwargs = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "class_token": False,
              "global_pool": "avg", "img_size": 32, "num_classes": 0}
    model = timm.create_model("vit_tiny_patch16_224", **kwargs)
    export_backbone(model.state_dict(), tmp_path / "export", "vit_tiny_patch16_224", kwargs)
    argv = ["knn", str(REPO / "configs/finetune/knn_demo.yaml"), f"pretrained={tmp_path / 'export'}",
            f"data.train={digits_dir}", f"data.val={digits_dir}", "data.prepare=none", f"run.dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match=r"pretrained=.*: VisionTransformer without a CLS token \(class_token=False\): "
                                          r"the ViT features \(features.blocks"):
        check_finetune(argv, 2)
    assert not (tmp_path / "run").exists()
