"""engine.autocast: bf16 by autocast on fp32 weights at ZeRO 0-2, DeepSpeed's bf16 at ZeRO-3, and a
resumed run keeps the mode its checkpoint was written in (those that record none were DeepSpeed's
bf16); the DeepSpeed config follows the resolved mode."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pretrain.config import ConfigError
from pretrain.engine import deepspeed_config, describe_precision, resolve_autocast, weights_dtype
from pretrain.state.checkpointer import checkpoint_precision
from tests.conftest import REPO, python_env
from tests.helpers import synthetic_config


@pytest.mark.parametrize("stage, autocast", [(0, True), (1, True), (2, True), (3, False)])
def test_auto_is_autocast_below_zero3(stage, autocast):
    cfg = resolve_autocast(synthetic_config("engine.precision=bf16", f"engine.zero_stage={stage}"), None)
    assert cfg.engine.autocast is autocast
    assert weights_dtype(cfg.engine) == (torch.float32 if autocast else torch.bfloat16)
    ds = deepspeed_config(cfg, 1)
    assert ds["bf16"]["enabled"] is not autocast and ds["torch_autocast"]["enabled"] is autocast
    assert describe_precision(cfg.engine).startswith("bf16 autocast" if autocast else "bf16 weights")


def test_fp32_and_fp16_never_autocast_and_fp16_refuses_it():
    for precision in ("fp32", "fp16"):
        cfg = resolve_autocast(synthetic_config(f"engine.precision={precision}"), None)
        assert cfg.engine.autocast is False and weights_dtype(cfg.engine) != torch.bfloat16
    with pytest.raises(ConfigError, match="engine.autocast"):
        synthetic_config("engine.precision=fp16", "engine.autocast=true")


def write_checkpoint_meta(run_dir, meta: dict) -> None:
    tag = run_dir / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    (tag / "meta.json").write_text(json.dumps(meta))
    (run_dir / "checkpoints" / "latest").write_text("step_00000002")


def test_a_resumed_run_keeps_its_checkpoints_mode_and_older_checkpoints_were_deepspeeds_bf16(tmp_path):
    write_checkpoint_meta(tmp_path, {"objective": "supervised"})  # written before the mode was recorded
    cfg = synthetic_config("engine.precision=bf16", f"run.dir={tmp_path}")
    saved = checkpoint_precision(cfg)
    assert saved == {"precision": "bf16", "autocast": False}
    assert resolve_autocast(cfg, saved).engine.autocast is False
    with pytest.raises(ConfigError, match="engine.autocast=True: the checkpoint this run resumes"):
        resolve_autocast(synthetic_config("engine.precision=bf16", "engine.autocast=true", f"run.dir={tmp_path}"),
                         saved)
    fresh = synthetic_config("engine.precision=bf16", f"run.dir={tmp_path}", "train.resume=false")
    assert checkpoint_precision(fresh) is None and resolve_autocast(fresh, None).engine.autocast is True


MODES_AGREE = """
import torch
from pretrain.dist import init_distributed
from pretrain.engine import Engine, resolve_autocast
from pretrain.objectives.base import RunContext
from pretrain.objectives.build import build_objective
from tests.conftest import TINY_VIT
from tests.helpers import synthetic_config

torch.set_num_threads(1)
dist = init_distributed()
batch = {"image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)),
         "label": torch.tensor([1, 2, 3, 4])}
losses = {}
for autocast in (True, False):
    cfg = resolve_autocast(synthetic_config("engine.precision=bf16", f"engine.autocast={autocast}", "data.image_size=32",
                                            "objective.mixup=0", "objective.cutmix=0", "objective.reprob=0",
                                            "model.drop_path=0", *TINY_VIT), None)
    torch.manual_seed(0)
    objective = build_objective(cfg, RunContext(10, 4, 4, dist, "bf16", autocast))
    engine = Engine(objective, objective.param_groups(), cfg, dist)
    losses[autocast] = []
    for step in range(4):
        engine.set_hyperparameters(1e-3, 0.05, step)
        loss, _ = engine.forward(batch, step)
        engine.backward(loss)
        engine.step()
        losses[autocast].append(loss.item())
print(losses)
for ours, theirs in zip(losses[True], losses[False]):
    assert abs(ours - theirs) <= 0.02 * abs(theirs), losses
assert losses[True][-1] < losses[True][0], losses  # it trains
print("modes agree")
"""


def test_autocast_trains_to_the_losses_of_deepspeeds_bf16_within_bf16_tolerance():
    result = subprocess.run([sys.executable, "-c", MODES_AGREE], cwd=REPO, env=python_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "modes agree" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]
