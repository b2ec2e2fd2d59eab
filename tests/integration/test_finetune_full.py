"""A tiny ViT pre-trained by vitscale, then fine-tuned at a larger resolution with few labels."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from finetune import weights
from pretrain.data.builtin import digits_items
from pretrain.data.write import write_shards
from tests.conftest import QUIET, run_module

# Patch 8 on 32 px digits: 16 tokens, learns in a couple of hundred steps on a CPU.
MODEL = ["model.name=vit_tiny_patch16_224",
         "model.kwargs={patch_size: 8, embed_dim: 48, depth: 2, num_heads: 2, mlp_ratio: 2.0}"]
FINETUNE = [*QUIET, "data.image_size=48", "model.drop_path=0", "objective.label_smoothing=0", "data.batch_size=32",
            "train.epochs=null", "train.steps=30", "train.eval_every=15", "optim.warmup_steps=5", "optim.lr=2.0e-3",
            "engine.zero_stage=1"]


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory, digits_dir):
    run_dir = tmp_path_factory.mktemp("pretrained") / "run"
    run_module("pretrain", f"run.dir={run_dir}", f"data.train={digits_dir}", f"data.val={digits_dir}", *QUIET, *MODEL,
               "train.steps=120", "optim.lr=3.0e-3", "objective.scale=[0.8,1.0]", "optim.warmup_steps=10", "data.batch_size=64",
               "objective.label_smoothing=0", "engine.precision=fp32", "engine.zero_stage=1", "train.ckpt_every=0")
    return run_dir


@pytest.fixture(scope="module")
def few_labels(tmp_path_factory):
    """Ten labelled digits per class."""
    classes, items = digits_items()
    per_class: dict[int, list] = {}
    for item in items:
        per_class.setdefault(item.label, []).append(item)
    out = tmp_path_factory.mktemp("few") / "shards"
    write_shards([i for c in sorted(per_class) for i in per_class[c][-10:]], classes, out, per_shard=50)
    return out


def test_deepspeed_checkpoint_holds_the_exported_weights(pretrained_run):
    exported = load_file(str(pretrained_run / "export" / "backbone.safetensors"))
    consolidated, prefix = weights.strip_prefix(weights.read(pretrained_run / "checkpoints"), set(exported))
    assert prefix == ""  # the supervised objective's backbone, as its export names it (pretrain.run_backbone)
    assert set(consolidated) == set(exported)
    for key, value in exported.items():
        torch.testing.assert_close(consolidated[key], value, msg=key)


def finetune(run_dir, pretrained, data, digits_dir, *extra):
    run_module("finetune", "full", "configs/finetune/full_demo.yaml", f"pretrained={pretrained}",
               f"run.dir={run_dir}", f"data.train={data}", f"data.val={digits_dir}", "data.prepare=none",
               *FINETUNE, *MODEL, *extra)
    return json.loads((run_dir / "run.json").read_text())["final"]


def test_pretrained_beats_random_init_at_a_larger_resolution(pretrained_run, few_labels, digits_dir, tmp_path):
    pre = json.loads((pretrained_run / "run.json").read_text())["final"]["val/top1"]
    tuned = finetune(tmp_path / "tuned", pretrained_run, few_labels, digits_dir)
    scratch = finetune(tmp_path / "scratch", "null", few_labels, digits_dir)
    assert pre > 0.3, pre  # the pre-training learned something to start from (chance is 0.1)
    assert tuned["val/top1"] > scratch["val/top1"] + 0.1, (tuned, scratch)
    assert "val/ema_top1" in tuned  # the recipe's EMA is evaluated beside the weights
    best = json.loads((tmp_path / "tuned" / "best" / "backbone.json").read_text())
    assert best["val/top1"] >= tuned["val/top1"] and best["kwargs"]["img_size"] == 48
    assert load_file(str(tmp_path / "tuned" / "export" / "backbone.safetensors"))["pos_embed"].shape == (1, 37, 48)
