"""Each stage package's ``check(argv, world_size)``, the one pre-flight check every launch backend calls
(launch.stage), and ``config(argv)``, what a chain's later stage is checked with."""

from __future__ import annotations

import pytest

from finetune.__main__ import check as check_finetune, config as finetune_config
from launch.stage import Stage, split_stage
from pretrain.__main__ import check as check_pretrain, config as pretrain_config
from pretrain.config import ConfigError
from pretrain.data.shards import ShardError
from tests.conftest import QUIET, REPO, TINY_VIT

RECIPE = str(REPO / "configs/pretrain/digits_supervised.yaml")
FINETUNE = REPO / "configs/finetune"


def pretrain_argv(run_dir, data, *extra) -> list[str]:
    return [RECIPE, f"run.dir={run_dir}", f"data.train={data}", "data.val=null", "data.prepare=none", *TINY_VIT,
            *QUIET, "train.epochs=null", "train.steps=3", *extra]


def test_pretrain_check_loads_the_config_for_the_world_size_and_finds_the_data(tmp_path, digits_dir):
    cfg = check_pretrain(pretrain_argv(tmp_path / "run", digits_dir, "data.global_batch=16"), 2)
    assert cfg.run.dir == str(tmp_path / "run") and cfg.model.name == "vit_tiny_patch16_224"
    assert not (tmp_path / "run").exists()  # checked, nothing written
    with pytest.raises(ConfigError, match="data.global_batch=16: not divisible by the world size 3"):
        check_pretrain(pretrain_argv(tmp_path / "run", digits_dir, "data.global_batch=16"), 3)
    with pytest.raises(ShardError, match="missing"):
        check_pretrain(pretrain_argv(tmp_path / "run", tmp_path / "none-{000..001}.tar", "data.num_classes=10"), 1)
    with pytest.raises(ConfigError, match="model.name='vit_nonesuch': timm has no such model"):
        check_pretrain(pretrain_argv(tmp_path / "run", digits_dir, "model.name=vit_nonesuch"), 1)


def test_pretrain_config_reads_overrides_without_a_recipe_and_checks_no_data(tmp_path):
    cfg = pretrain_config([f"run.dir={tmp_path}", "data.synthetic=true", "train.steps=2", "data.train=/nowhere"])
    assert cfg.run.dir == str(tmp_path) and cfg.train.steps == 2
    with pytest.raises(ConfigError, match="optim.lrr"):
        pretrain_config([f"run.dir={tmp_path}", "optim.lrr=1"])


def test_finetune_check_names_what_is_missing_and_checks_for_the_world_size(tmp_path, digits_dir):
    knn = str(FINETUNE / "knn_demo.yaml")
    data = [f"data.train={digits_dir}", f"data.val={digits_dir}", "data.prepare=none"]
    with pytest.raises(ConfigError, match="finetune needs a stage"):
        check_finetune(["probe", knn], 1)
    with pytest.raises(ConfigError, match="finetune knn: a CONFIG"):
        check_finetune(["knn"], 1)
    with pytest.raises(ConfigError, match="pretrained='/no/such/run': no such file"):
        check_finetune(["knn", knn, "pretrained=/no/such/run", *data], 2)
    cfg = check_finetune(["knn", knn, f"pretrained={tmp_path}", f"run.dir={tmp_path / 'knn'}", *data], 2)
    assert cfg.run.dir == str(tmp_path / "knn")
    with pytest.raises(ShardError, match="missing"):
        check_finetune(["knn", knn, f"pretrained={tmp_path}", f"data.train={tmp_path}/x-{{0..1}}.tar",
                        "data.prepare=none"], 1)
    full = [str(FINETUNE / "full_demo.yaml"), "pretrained=null", f"run.dir={tmp_path / 'full'}", *data, *TINY_VIT,
            *QUIET, "data.global_batch=16", "finetune.ema=0"]
    assert check_finetune(["full", *full], 2).data.global_batch == 16
    with pytest.raises(ConfigError, match="data.global_batch=16: not divisible by the world size 3"):
        check_finetune(["full", *full], 3)


def test_finetune_config_does_not_need_the_weights_a_chain_will_write(tmp_path):
    argv = ["linear", str(FINETUNE / "linear_demo.yaml"), f"pretrained={tmp_path / 'not-yet'}",
            f"run.dir={tmp_path / 'probe'}"]
    assert Stage("finetune", argv).run_dir() == tmp_path / "probe"
    with pytest.raises(ConfigError, match="no such file"):
        Stage("finetune", argv).check(1)
    with pytest.raises(ConfigError, match="linear.lrs"):
        finetune_config([*argv, "linear.lrs=[-1]"])


def test_a_stage_command_line_defaults_to_pretrain():
    assert split_stage(["--", "a.yaml", "x=1"]) == Stage("pretrain", ["a.yaml", "x=1"])
    assert split_stage(["finetune", "knn", "b.yaml"]) == Stage("finetune", ["knn", "b.yaml"])
    assert split_stage([]) == Stage("pretrain", [])
