"""Backbone options (fused attention, activation checkpointing) and the run's batch/lr arithmetic."""

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.data.shards import ShardSet
from pretrain.models.backbone import create_backbone
from pretrain.plan import make_plan
from tests.conftest import TINY_SWIN, TINY_VIT
from tests.helpers import synthetic_config


@pytest.mark.parametrize("model", [TINY_VIT, TINY_SWIN], ids=["vit", "swin"])
@pytest.mark.parametrize("fused", [True, False])
def test_fused_attention_switch_reaches_every_attention_layer(model, fused):
    backbone = create_backbone(synthetic_config(*model, f"model.fused_attn={fused}").model, 32, 10)
    flags = {m.fused_attn for m in backbone.modules() if hasattr(m, "fused_attn")}
    assert flags == {fused}  # Swin's window attention included (timm's "experimental" level)


@pytest.mark.parametrize("model", [TINY_VIT, TINY_SWIN], ids=["vit", "swin"])
def test_activation_checkpointing_changes_memory_not_results(model):
    images = torch.randn(4, 3, 32, 32)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        backbone = create_backbone(synthetic_config(*model, f"model.grad_checkpointing={checkpointing}",
                                                    "model.drop_path=0").model, 32, 10)
        backbone(images).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in backbone.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_unknown_timm_kwargs_are_a_config_error():
    with pytest.raises(ConfigError, match="model.name"):
        create_backbone(synthetic_config(*TINY_VIT, "model.kwargs={patch_size: 4, depthh: 2}").model, 32, 10)


def test_plan_scales_lr_with_the_global_batch_and_counts_epochs():
    cfg = load_config(None, ["data.train=x.tar", "data.batch_size=32", "train.grad_accum=2", "train.epochs=3",
                             "optim.base_lr=1e-3", "optim.base_batch=256", "optim.warmup_epochs=0.5"])
    plan = make_plan(cfg, world_size=4, train=ShardSet(["x.tar"], samples=2560, classes=list("abc")))
    assert plan.global_batch == 256 and plan.peak_lr == pytest.approx(1e-3)
    assert plan.steps_per_epoch == 10 and plan.total_steps == 30 and plan.warmup_steps == 5
    assert plan.num_classes == 3


def test_plan_needs_a_sample_count_for_epochs():
    cfg = load_config(None, ["data.train=x.tar", "train.epochs=1", "data.num_classes=5"])
    with pytest.raises(ConfigError, match="train.epochs"):
        make_plan(cfg, world_size=1, train=ShardSet(["x.tar"]))
