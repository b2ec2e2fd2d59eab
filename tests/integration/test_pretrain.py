"""Pre-training end to end, 2 processes through `python -m launch local`, on the digits shards.

Runs are shared between tests (one module-scoped cache), because each costs seconds of DeepSpeed
start-up: the uninterrupted ZeRO-3 run serves the resume, ZeRO-0-vs-3 and export checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from tests.conftest import QUIET, REPO, TINY_VIT, load_export, python_env, run_module
from tests.faults import fault_env

RECIPE = str(REPO / "configs/pretrain/digits_supervised.yaml")
# fp32, logged every step, no checkpoint except at the end: what the equality checks need.
EXACT = [*QUIET, *TINY_VIT, "engine.precision=fp32", "train.epochs=null", "train.steps=10", "train.log_every=1",
         "train.ckpt_every=0", "train.eval_every=0", "data.batch_size=16", "optim.lr=2e-3", "optim.warmup_steps=2",
         "data.val=null"]


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}


def exported(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "export" / "backbone.safetensors"))


class Runs:
    """Named runs, each trained once per test module."""

    def __init__(self, root: Path, digits: Path) -> None:
        self.root, self.digits, self.done = root, digits, {}

    def __call__(self, name: str, *overrides: str, nproc: int = 2, stop_at: int | None = None) -> Path:
        run_dir = self.root / name
        if name not in self.done:
            common = [f"run.dir={run_dir}", f"data.train={self.digits}", "data.prepare=none", *EXACT]
            if stop_at is not None:  # the same run in two invocations: stop, then resume
                run_module("launch", "local", "--nproc", str(nproc), RECIPE, *common, *overrides,
                           f"train.stop_at={stop_at}")
                assert not (run_dir / "export").exists(), "a stopped run must not export"
            run_module("launch", "local", "--nproc", str(nproc), RECIPE, *common, *overrides)
            self.done[name] = run_dir
        return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_dir) -> Runs:
    return Runs(tmp_path_factory.mktemp("runs"), digits_dir)


@pytest.mark.parametrize("zero", [0, 2, 3])  # each resume reads DeepSpeed's files weights-only
def test_resume_equals_uninterrupted(runs, zero):
    whole = runs(f"zero{zero}", f"engine.zero_stage={zero}")
    split = runs(f"zero{zero}-split", f"engine.zero_stage={zero}", stop_at=5)
    assert json.loads((split / "run.json").read_text())["resumed_from"] == "step_00000005"
    a, b = losses(whole), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 11))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-6
    wa, wb = exported(whole), exported(split)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6


def test_zero0_and_zero3_give_the_same_losses(runs):
    a = losses(runs("zero0", "engine.zero_stage=0"))
    b = losses(runs("zero3", "engine.zero_stage=3"))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5
    assert a[10] < a[1]  # and they are training


def test_activation_checkpointing_under_zero3_gives_the_same_losses(runs):
    a = losses(runs("zero3", "engine.zero_stage=3"))
    b = losses(runs("zero3-checkpointing", "engine.zero_stage=3", "model.grad_checkpointing=true"))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5


def test_gradient_accumulation_equals_the_large_batch(runs):
    big = runs("zero2", "engine.zero_stage=2")
    accumulated = runs("zero2-accum", "engine.zero_stage=2", "data.batch_size=8", "train.grad_accum=2")
    a, b = losses(big), losses(accumulated)
    assert abs(a[1] - b[1]) < 1e-6  # the same 16 samples per rank in the first step
    # Afterwards only float summation order differs (one mean of 16 against two means of 8),
    # which Adam's normalization amplifies a little over the steps.
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4
    wa, wb = exported(big), exported(accumulated)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


def test_export_loads_into_timm_and_matches_deepspeeds_consolidation(runs):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir = runs("zero3", "engine.zero_stage=3")
    meta, _, model = load_export(run_dir)
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag="step_00000010")
    from_checkpoint = {k.removeprefix("model."): v for k, v in consolidated.items()}
    export = exported(run_dir)
    assert set(from_checkpoint) == {k for k in export if k in dict(model.named_parameters())}
    for key, value in from_checkpoint.items():
        assert torch.equal(value.float(), export[key]), key
    # The model timm built from the file holds exactly the exported tensors, buffers included.
    for key, value in model.state_dict().items():
        assert torch.equal(value, export[key]), key
    reference = timm.create_model(meta["model"], **meta["kwargs"]).eval()
    reference.load_state_dict(from_checkpoint)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))


# Small models that learn digits in a hundred-odd steps (coarser patches than TINY_*).
LEARN_VIT = ["model.name=vit_tiny_patch16_224", "model.kwargs={patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2, "
             "mlp_ratio: 2.0, global_pool: avg, class_token: false}"]
LEARN_SWIN = ["model.name=swin_tiny_patch4_window7_224",
              "model.kwargs={patch_size: 4, window_size: 4, embed_dim: 32, depths: [1, 1], num_heads: [2, 4]}"]


@pytest.mark.parametrize("name, model, zero", [("vit", LEARN_VIT, 2), ("swin", LEARN_SWIN, 3)])
def test_tiny_models_learn_the_digits(runs, name, model, zero):
    run_dir = runs(f"learn-{name}", *model, f"engine.zero_stage={zero}", "train.steps=160", "data.batch_size=32",
                   f"data.val={runs.digits}", "optim.warmup_steps=10")
    final = json.loads((run_dir / "run.json").read_text())["final"]
    assert final["val/top1"] > 0.4, final  # chance is 0.1


@pytest.mark.parametrize("override, key", [("data.batch_size=-8", "data.batch_size"),
                                           ("train.stepz=10", "train.stepz"),
                                           ("engine.zero_stage=5", "engine.zero_stage"),
                                           ("optim.lr=fast", "optim.lr"),
                                           ("optim.lr=nan", "optim.lr='nan': must be finite"),
                                           ("data.image_size=33", "data.image_size=33: not a multiple of the patch"),
                                           ("model.kwargs={embed_dim: 30, num_heads: 4}", "model.kwargs"),
                                           ("engine.deepspeed={train_batch_size: 7}",
                                            "engine.deepspeed.train_batch_size=7"),
                                           ("run.dir=/dev/null", "run.dir='/dev/null': is a file")])
def test_bad_config_fails_before_any_process_or_file(tmp_path, digits_dir, override, key):
    run_dir = tmp_path / "never"
    # data.val too: the recipe's own (~/.cache/vitscale/digits) is there only where the demo ran, and
    # its missing shards would be reported before the model's checks.
    result = run_module("launch", "local", "--nproc", "2", RECIPE, f"run.dir={run_dir}", f"data.train={digits_dir}",
                        f"data.val={digits_dir}", override, check=False)
    assert result.returncode == 2
    assert key in result.stderr and "error:" in result.stderr
    assert "torch.distributed" not in result.stderr and "rank" not in result.stderr.lower()
    assert not run_dir.exists()


def test_missing_shards_are_listed_before_training(tmp_path):
    result = run_module("pretrain", RECIPE, f"run.dir={tmp_path / 'run'}", "data.prepare=none",
                        f"data.train={tmp_path}/train-{{000000..000002}}.tar", "data.num_classes=10",
                        "train.epochs=null", "train.steps=1", check=False)
    assert result.returncode == 2
    assert "3 of 3 shards are missing" in result.stderr and "train-000001.tar" in result.stderr
    assert not (tmp_path / "run").exists()


def test_nonfinite_steps_are_skipped_entirely(runs, tmp_path):
    """NaN losses at steps 2 and 3 of 4: both skipped on every rank, so the final weights are the
    weights after step 2, weight decay and all."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir = tmp_path / "nan"
    env_args = ["launch", "local", "--nproc", "2", RECIPE, f"run.dir={run_dir}", f"data.train={runs.digits}",
                "data.prepare=none", *EXACT, "engine.zero_stage=3", "train.steps=4", "train.ckpt_every=2",
                "train.max_nonfinite=3"]
    run_module(*env_args, env=fault_env(python_env(), VITSCALE_TEST_NAN_STEPS="2,3"))
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["nonfinite_steps"] == 2 and summary["step"] == 4
    after_step_2 = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag="step_00000002")
    export = exported(run_dir)
    for key, value in after_step_2.items():
        assert torch.equal(value.float(), export[key.removeprefix("model.")]), key


def test_nonfinite_losses_in_a_row_stop_the_run(runs, tmp_path):
    run_dir = tmp_path / "nan-stop"
    result = run_module("pretrain", RECIPE, f"run.dir={run_dir}", f"data.train={runs.digits}", "data.prepare=none",
                        *EXACT, "engine.zero_stage=0", "train.steps=8", "train.max_nonfinite=3", check=False,
                        env=fault_env(python_env(), VITSCALE_TEST_NAN_STEPS="1,2,3,4,5"))
    assert result.returncode == 1
    assert "step 3: 3 non-finite losses in a row" in result.stderr
    assert not (run_dir / "checkpoints" / "latest").exists()
