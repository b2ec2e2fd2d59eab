"""AdamW groups: no weight decay on norms, biases, tokens, position embeddings, relative position biases."""

import pytest

from pretrain.config import ConfigError
from tests.conftest import TINY_SWIN, TINY_VIT
from tests.helpers import synthetic_config, tiny_objective


def groups_by_name(model_args, no_decay=None):
    rule = [] if no_decay is None else [f"optim.no_decay={no_decay}"]
    objective = tiny_objective(synthetic_config("data.image_size=32", *model_args, *rule), steps_per_epoch=1,
                               total_steps=1)
    names = {id(p): n for n, p in objective.named_parameters()}
    decayed, plain = objective.param_groups()
    assert decayed["apply_weight_decay"] and not plain["apply_weight_decay"] and plain["weight_decay"] == 0
    return {names[id(p)] for p in decayed["params"]}, {names[id(p)] for p in plain["params"]}


@pytest.mark.parametrize("model, no_decay", [(TINY_VIT, {"model.pos_embed", "model.cls_token"}),
                                             (TINY_SWIN, {"model.layers.0.blocks.0.attn.relative_position_bias_table"})])
def test_weight_decay_only_on_weight_matrices(model, no_decay):
    decayed, plain = groups_by_name(model)
    assert no_decay <= plain
    assert all(not n.endswith(".bias") and "norm" not in n for n in decayed)
    head = "model.head.fc" if model is TINY_SWIN else "model.head"
    assert f"{head}.weight" in decayed and f"{head}.bias" in plain
    assert any(n.endswith("qkv.weight") for n in decayed)


def test_no_decay_1d_only_decays_tokens_and_relative_position_tables():
    """DINO's and MoBY's official rule: only biases and norm weights are exempt."""
    decayed, plain = groups_by_name(TINY_VIT, "[1d]")
    assert {"model.pos_embed", "model.cls_token"} <= decayed
    assert all(n.endswith(".bias") or "norm" in n for n in plain) and "model.blocks.0.norm1.weight" in plain
    decayed, _ = groups_by_name(TINY_SWIN, "[1d]")
    assert "model.layers.0.blocks.0.attn.relative_position_bias_table" in decayed


def test_no_decay_globs_name_parameters():
    decayed, plain = groups_by_name(TINY_VIT, "[1d, '*pos_embed']")
    assert "model.pos_embed" in plain and "model.cls_token" in decayed


def test_no_decay_rejects_an_empty_entry():
    with pytest.raises(ConfigError, match="optim.no_decay"):
        synthetic_config("optim.no_decay=['']")
