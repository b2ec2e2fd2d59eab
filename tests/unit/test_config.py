"""Config: defaults, recipes as diffs, overrides, and errors that name the key."""

from pathlib import Path

import pytest
import yaml

from pretrain.config import Config, ConfigError, load_config, save_config
from pretrain.objectives.supervised import Config as SupervisedConfig

REPO = Path(__file__).resolve().parents[2]


def test_overrides_parse_yaml_values_and_nest():
    cfg = load_config(None, ["data.synthetic=true", "train.steps=7", "optim.lr=3e-4", "data.train=[a.tar, b.tar]",
                             "model.kwargs.depth=2", "train.clip_grad=null", "objective.scale=[0.5, 1]"])
    assert cfg.train.steps == 7 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.train == ["a.tar", "b.tar"] and cfg.model.kwargs == {"depth": 2}
    assert cfg.train.clip_grad is None
    assert isinstance(cfg.objective, SupervisedConfig) and cfg.objective.scale == (0.5, 1.0)


def test_recipe_base_chain_is_merged_under_the_recipe(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {name: swin_tiny_patch4_window7_224, drop_path: 0.2}\n"
                                        "train: {steps: 10}\ndata: {synthetic: true}\n")
    (tmp_path / "recipe.yaml").write_text("base: base.yaml\nmodel: {drop_path: 0.3}\n")
    cfg = load_config(tmp_path / "recipe.yaml", ["train.steps=20"])
    assert cfg.model.name == "swin_tiny_patch4_window7_224"
    assert cfg.model.drop_path == 0.3 and cfg.train.steps == 20


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(REPO / "configs/pretrain/digits_supervised.yaml", ["train.steps=5", "train.epochs=null"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


@pytest.mark.parametrize("recipe", sorted((REPO / "configs/pretrain").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, Config)


@pytest.mark.parametrize("override, key", [
    ("train.stepz=3", "train.stepz"),  # unknown key
    ("model.drop_path=high", "model.drop_path"),  # wrong type
    ("data.batch_size=-4", "data.batch_size"),  # out of range
    ("engine.zero_stage=5", "engine.zero_stage"),
    ("engine.precision=fp8", "engine.precision"),
    ("trian.steps=3", "trian"),  # unknown section
    ("objective.name=simclr", "objective.name"),
    ("objective.mixup=-1", "objective.mixup"),
    ("data.batch_size=true", "data.batch_size"),  # a bool is not an int
    ("data.image_column=' image'", "data.image_column"),  # not a column name
    ("data.label_column=__key__", "data.label_column"),
    ("data.label_column=3", "data.label_column"),
])
def test_bad_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["data.synthetic=true", "train.steps=1", override])


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"did you mean train\.steps"):
        load_config(None, ["data.synthetic=true", "train.stepz=3"])


def test_steps_and_epochs_are_exclusive():
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["data.synthetic=true", "train.steps=3", "train.epochs=1"])
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["data.synthetic=true"])


def test_odd_batch_with_mixup_fails_before_training():
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(None, ["data.synthetic=true", "train.steps=1", "data.batch_size=7"])
    load_config(None, ["data.synthetic=true", "train.steps=1", "data.batch_size=7", "objective.mixup=0",
                       "objective.cutmix=0"])


def test_unreadable_recipe_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_resolved_config_is_plain_yaml():
    cfg = load_config(None, ["data.synthetic=true", "train.steps=1"])
    dumped = yaml.safe_load(yaml.safe_dump(cfg.to_dict()))
    assert dumped["data"]["mean"] == list(cfg.data.mean)


@pytest.mark.parametrize("overrides, message", [
    (["engine.offload=optimizer"], r"engine\.offload='optimizer': .*needs engine\.zero_stage 1, 2 or 3"),
    (["engine.zero_stage=2", "engine.offload=all"], r"engine\.offload='all': .*needs engine\.zero_stage=3"),
    (["engine.zero_stage=3", "engine.offload_path=/nvme"], r"engine\.offload_path='/nvme': .*set engine\.offload"),
    (["engine.zero_stage=2", "engine.offload=optimizer", "engine.offload_path=/nvme"],
     r"engine\.offload_path='/nvme': .*needs engine\.zero_stage=3"),
    (["engine.zero_stage=3", "engine.offload=cpu"], r"engine\.offload='cpu': expected one of"),
    *[([f"objective.name={name}", "engine.zero_stage=3", "engine.offload=all", "engine.offload_path=/nvme"],
       rf"engine\.offload=all with engine\.offload_path='/nvme': objective\.name='{name}' keeps a momentum teacher")
      for name in ("dino", "moby")],
])
def test_impossible_offload_combinations_fail_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.synthetic=true", "train.steps=1", *overrides])


def test_offload_becomes_deepspeeds_zero_offload_settings():
    from pretrain.engine import deepspeed_config

    cfg = load_config(None, ["data.synthetic=true", "train.steps=1", "engine.zero_stage=3", "engine.offload=all",
                             "engine.offload_path=/nvme"])
    zero = deepspeed_config(cfg, world_size=2)["zero_optimization"]
    assert zero["stage"] == 3
    for key in ("offload_optimizer", "offload_param"):
        assert zero[key]["device"] == "nvme" and zero[key]["nvme_path"] == "/nvme"
    cfg = load_config(None, ["data.synthetic=true", "train.steps=1", "engine.zero_stage=1", "engine.offload=optimizer"])
    zero = deepspeed_config(cfg, world_size=2)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and "offload_param" not in zero
    assert "offload_optimizer" not in deepspeed_config(load_config(None, ["data.synthetic=true", "train.steps=1"]),
                                                       world_size=2)["zero_optimization"]
