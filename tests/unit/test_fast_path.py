"""The GPU fast path's switches, checked on the CPU: fused attention gives Swin's results, including
its shifted (masked) windows; engine.compile reaches the objective the engine trains."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pretrain.config import ConfigError
from pretrain.models.backbone import create_backbone
from tests.conftest import REPO, python_env
from tests.helpers import synthetic_config

# Two blocks per stage: the second of each is shifted, i.e. takes timm's masked attention path.
SWIN = ["model.name=swin_tiny_patch4_window7_224", "model.drop_path=0",
        "model.kwargs={patch_size: 2, window_size: 4, embed_dim: 16, depths: [2, 2], num_heads: [1, 2]}"]


def test_swin_fused_attention_matches_the_unfused_path_with_shifted_windows():
    outputs, grads = [], []
    for fused in (True, False):
        torch.manual_seed(0)
        model = create_backbone(synthetic_config(*SWIN, f"model.fused_attn={fused}").model, 32, 10)
        attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
        assert attention and all(m.fused_attn is fused for m in attention)
        shifted = [b for b in model.modules() if getattr(b, "shift_size", 0) and b.attn_mask is not None]
        assert len(shifted) == 2, "the test needs the masked (shifted-window) path in every stage"
        images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        out = model(images)
        out.square().mean().backward()
        outputs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


# Under bf16 the engine's Swin must hand fused attention a mask of the query's dtype: CUDA refuses
# any other, the CPU kernel does not, so the check wraps the attention function. In DeepSpeed's bf16
# the engine casts the masks with the weights; under autocast they stay fp32 with the weights, and
# the attention must run inside autocast, which casts query and mask to bf16 together on CUDA.
BF16_SWIN_CHECK = """
import sys
import torch
import torch.nn.functional as F
from pretrain.dist import init_distributed
from pretrain.engine import Engine
from pretrain.objectives.base import RunContext
from pretrain.objectives.build import build_objective
from tests.helpers import synthetic_config
from tests.unit.test_fast_path import SWIN
attention, calls = F.scaled_dot_product_attention, []
def recorded(q, k, v, attn_mask=None, **kwargs):
    calls.append((q.dtype, None if attn_mask is None else attn_mask.dtype, torch.is_autocast_enabled("cpu")))
    return attention(q, k, v, attn_mask=attn_mask, **kwargs)
F.scaled_dot_product_attention = recorded
autocast = sys.argv[1] == "true"
cfg = synthetic_config("engine.precision=bf16", f"engine.autocast={sys.argv[1]}", "data.image_size=32",
                       "objective.mixup=0", "objective.cutmix=0", "objective.reprob=0", *SWIN)
dist = init_distributed()
objective = build_objective(cfg, RunContext(10, 1, 1, dist, cfg.engine.precision, autocast))
engine = Engine(objective, objective.param_groups(), cfg, dist)
masks = [m.attn_mask for m in engine.module.modules() if getattr(m, "attn_mask", None) is not None]
assert masks and {m.dtype for m in masks} == {torch.float32 if autocast else torch.bfloat16}
batch = {"image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), "label": torch.tensor([1, 2])}
loss, _ = engine.forward(batch, 0)
assert torch.isfinite(loss) and calls
if autocast:
    assert all(inside for _, _, inside in calls), calls
else:
    assert all(mask in (None, query) for query, mask, _ in calls), calls
print("masks follow bf16")
"""


@pytest.mark.parametrize("autocast", ["true", "false"])
def test_swin_masks_follow_the_engines_precision(autocast):
    result = subprocess.run([sys.executable, "-c", BF16_SWIN_CHECK, autocast], cwd=REPO, env=python_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "masks follow bf16" in result.stdout, result.stderr[-3000:]


def test_default_backbones_use_fused_attention():
    for model in (["model.name=vit_tiny_patch16_224", "model.kwargs={depth: 1}"], SWIN):
        backbone = create_backbone(synthetic_config(*model).model, 32, 10)
        assert {m.fused_attn for m in backbone.modules() if hasattr(m, "fused_attn")} == {True}


def test_compile_is_validated_and_off_by_default():
    assert synthetic_config().engine.compile is False
    with pytest.raises(ConfigError, match="engine.compile"):
        synthetic_config("engine.compile=sometimes")
    assert synthetic_config("engine.compile=true").engine.compile_backend == "inductor"
    with pytest.raises(ConfigError, match="engine.compile_backend='tvm': expected one of"):
        synthetic_config("engine.compile=true", "engine.compile_backend=tvm")
    with pytest.raises(ConfigError, match="engine.compile_backend='aot_eager': is the backend of engine.compile"):
        synthetic_config("engine.compile_backend=aot_eager")


# What the engine does with engine.compile=true, without running the compiled step
# (tests/integration/test_compile.py runs it): the objective's step methods are compiled on the
# instance, no module is wrapped, and parameter names (checkpoints, exports) do not change.
ENGINE_CHECK = """
import torch
from pretrain.dist import init_distributed
from pretrain.engine import Engine
from pretrain.objectives.base import RunContext
from pretrain.objectives.build import build_objective
from tests.conftest import TINY_VIT
from tests.helpers import synthetic_config
cfg = synthetic_config("engine.precision=fp32", "engine.compile=true", *TINY_VIT)
dist = init_distributed()
objective = build_objective(cfg, RunContext(10, 1, 1, dist, cfg.engine.precision))
names = [n for n, _ in objective.named_parameters()]
engine = Engine(objective, objective.param_groups(), cfg, dist)
assert engine.module is objective
for step in ("micro_step", "val_sums"):
    assert hasattr(vars(objective)[step], "_torchdynamo_orig_callable"), step
assert all(m._compiled_call_impl is None for m in objective.modules())
assert [n for n, _ in engine.module.named_parameters()] == names
print("compiled steps")
"""


def test_engine_compiles_the_objectives_steps_in_place():
    result = subprocess.run([sys.executable, "-c", ENGINE_CHECK], cwd=REPO, env=python_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "compiled steps" in result.stdout, result.stderr[-3000:]
