"""The gradient norm a log line shows comes from where the engine has it: measured on the device
before the step at ZeRO-0 on fp32 weights (the engine steps torch's optimizer there), DeepSpeed's
otherwise; both are the norm of the gradients the objective's loss gives, and only a step that logs
reads it on the host."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO, python_env

NORM_CHECK = """
import torch
from pretrain.dist import init_distributed
from pretrain.engine import Engine
from pretrain.objectives.base import RunContext
from pretrain.objectives.build import build_objective
from tests.conftest import TINY_VIT
from tests.helpers import synthetic_config

dist = init_distributed()
batch = {"image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)),
         "label": torch.tensor([1, 2])}


def objective(cfg):
    torch.manual_seed(0)
    return build_objective(cfg, RunContext(10, 1, 1, dist, "fp32"))


def config(stage):
    return synthetic_config("engine.precision=fp32", f"engine.zero_stage={stage}", "data.image_size=32",
                            "objective.mixup=0", "objective.cutmix=0", "objective.reprob=0", "model.drop_path=0",
                            *TINY_VIT)


reference = objective(config(0))
loss, _ = reference(batch, 0)
loss.backward()
expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters() if p.grad is not None]))
for stage in (0, 1):
    cfg = config(stage)
    module = objective(cfg)
    engine = Engine(module, module.param_groups(), cfg, dist)
    for measure in (False, True):
        loss, _ = engine.forward(batch, 0)
        engine.backward(loss)
        norm = engine.step(measure_grad_norm=measure)
        if not measure:
            assert norm is None, norm
            continue
        assert abs(norm - expected.item()) < 1e-4 * expected.item(), (stage, norm, expected.item())
print("norms agree")
"""


def test_the_logged_gradient_norm_is_the_gradients_norm_at_zero0_and_zero1():
    result = subprocess.run([sys.executable, "-c", NORM_CHECK], cwd=REPO, env=python_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "norms agree" in result.stdout, result.stderr[-3000:]
