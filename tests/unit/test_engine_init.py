"""What the engine's start-up leaves in the optimizer: nothing, whatever DeepSpeed wrapper it builds."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, python_env

# One real step after start-up: Adam's step count must be 1 on every parameter, as in torch. DeepSpeed's
# unfused mixed-precision wrapper (bf16 without ZeRO) steps once on zero gradients while it starts.
FIRST_STEP_CHECK = """
import sys
import torch
from pretrain.dist import init_distributed
from pretrain.engine import Engine
from pretrain.objectives.base import RunContext
from pretrain.objectives.build import build_objective
from tests.conftest import TINY_VIT
from tests.helpers import synthetic_config
cfg = synthetic_config(f"engine.precision={sys.argv[1]}", f"engine.zero_stage={sys.argv[2]}", "data.image_size=32",
                       "objective.mixup=0", "objective.cutmix=0", "objective.reprob=0", *TINY_VIT)
dist = init_distributed()
objective = build_objective(cfg, RunContext(10, 1, 1, dist, cfg.engine.precision))
engine = Engine(objective, objective.param_groups(), cfg, dist)
assert not engine.optimizer.state, "the optimizer stepped during start-up"
engine.set_hyperparameters(1e-3, 0.05)
batch = {"image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), "label": torch.tensor([1, 2])}
loss, _ = engine.forward(batch, 0)
engine.backward(loss)
engine.step()
steps = {float(state["step"]) for state in engine.optimizer.state.values()}
assert steps == {1.0}, steps
print("one step")
"""


@pytest.mark.parametrize("precision,zero", [("bf16", 0), ("bf16", 1)])
def test_adam_counts_only_real_steps(precision, zero):
    result = subprocess.run([sys.executable, "-c", FIRST_STEP_CHECK, precision, str(zero)], cwd=REPO,
                            env=python_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "one step" in result.stdout, result.stderr[-3000:]
