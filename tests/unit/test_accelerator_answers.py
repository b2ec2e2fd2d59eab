"""Every place where vitscale's behaviour follows what DeepSpeed's accelerator reports, under each
answer (forced, tests/accelerator.py): the precisions a run may ask for, the device it must be, page-
locked offload buffers, the NVMe op, and the dtype of a partitioned build."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pretrain.config import ConfigError
from pretrain.engine import check_accelerator, check_offload, import_deepspeed, offload_config
from tests.accelerator import answers_of
from tests.conftest import REPO, python_env
from tests.helpers import synthetic_config

import_deepspeed()
from deepspeed.accelerator import get_accelerator  # noqa: E402  (after import_deepspeed picks the CPU)


@pytest.mark.parametrize("answers", ["fp16=no,bf16=no", "fp16=no,bf16=yes", "fp16=yes,bf16=yes"])
def test_a_precision_is_refused_where_the_accelerator_denies_it(force_accelerator, answers):
    force_accelerator(answers)
    offered = answers_of(answers)
    check_accelerator("fp32")  # always
    for precision in ("bf16", "fp16"):
        if offered[precision]:
            check_accelerator(precision)
        else:
            with pytest.raises(ConfigError, match=f"engine.precision='{precision}': not supported on cpu"):
                check_accelerator(precision)


def test_deepspeeds_accelerator_must_be_the_device_the_run_computes_on(monkeypatch):
    """init_distributed computes on CUDA where torch sees it, else on the CPU; DeepSpeed must agree
    (DS_ACCELERATOR set by hand, or a machine where DeepSpeed detects another accelerator)."""
    accelerator = type(get_accelerator())
    monkeypatch.setattr(accelerator, "device_name", lambda self, device_index=None: "cuda")
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    with pytest.raises(ConfigError, match="DS_ACCELERATOR='cuda': DeepSpeed's accelerator is 'cuda', but this run "
                                          "computes on 'cpu'"):
        check_accelerator("fp32")
    monkeypatch.setattr(accelerator, "device_name", lambda self, device_index=None: "cpu")
    check_accelerator("fp32")


@pytest.mark.parametrize("device, pinned", [("cpu", False), ("cuda", True)])
def test_offloaded_state_is_page_locked_only_beside_an_accelerator(monkeypatch, device, pinned):
    monkeypatch.setattr(type(get_accelerator()), "device_name", lambda self, device_index=None: device)
    zero = offload_config(synthetic_config("engine.zero_stage=3", "engine.offload=all"))["zero_optimization"]
    assert zero["offload_optimizer"] == zero["offload_param"] == {"device": "cpu", "pin_memory": pinned}


@pytest.mark.parametrize("compatible", [False, True])
def test_nvme_offload_is_refused_where_the_async_io_op_cannot_build(monkeypatch, tmp_path, compatible):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: compatible)
    cfg = synthetic_config("engine.zero_stage=3", "engine.offload=optimizer", f"engine.offload_path={tmp_path}")
    if compatible:
        check_offload(cfg)
    else:
        with pytest.raises(ConfigError, match="engine.offload_path=.*needs DeepSpeed's async_io op"):
            check_offload(cfg)


# zero.Init made to build bf16 (its config says bf16): the check after the build names the parameter.
OTHER_DTYPE_BUILD = """
import pretrain.engine.partitions as engine
from pretrain.dist import init_distributed
from pretrain.objectives.base import RunContext
from pretrain.objectives.build import build_objective
from tests.conftest import TINY_VIT
from tests.helpers import synthetic_config
engine.FP32_BUILD = {"bf16": {"enabled": True}, "fp16": {"enabled": False}}
cfg = synthetic_config("engine.zero_stage=3", "engine.precision=fp32", "data.image_size=32", *TINY_VIT)
dist = init_distributed()
try:
    engine.build_module(lambda: build_objective(cfg, RunContext(10, 1, 1, dist, "fp32")), cfg, dist)
except RuntimeError as e:
    print(e)
"""


def test_a_partitioned_build_in_another_dtype_fails_naming_the_parameter():
    done = subprocess.run([sys.executable, "-c", OTHER_DTYPE_BUILD], cwd=REPO, env=python_env(),
                          capture_output=True, text=True, timeout=300)
    assert ("engine.zero_init: parameter 'model.cls_token' is torch.bfloat16, not torch.float32, as "
            "deepspeed.zero.Init built them (DeepSpeed 0.") in done.stdout, done.stdout + done.stderr[-3000:]
    assert "engine.zero_init=false builds the model whole" in done.stdout
