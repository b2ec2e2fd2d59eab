"""engine.autocast: bf16 by autocast on fp32 weights at ZeRO 0-2, DeepSpeed's bf16 at ZeRO-3, and a
resumed run keeps the mode its checkpoint was written in (those that record none were DeepSpeed's
bf16); the DeepSpeed config follows the resolved mode."""

from __future__ import annotations

import json

import pytest
import torch

from pretrain.config import ConfigError
from pretrain.engine import deepspeed_config, describe_precision, resolve_autocast, weights_dtype
from pretrain.state.checkpointer import checkpoint_precision
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
