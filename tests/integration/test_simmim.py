"""SimMIM on 2 processes: ZeRO-0 and ZeRO-3 give the same losses (ViT and Swin), a resumed run the
same losses as an uninterrupted one, and it trains under bf16. The demo recipe's run (its loss, its
export, its probe) is tests/integration/test_mim_learning.py's."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_SWIN, TINY_VIT, run_worker

pytestmark = pytest.mark.slow

EXACT = ["run.threads=1", "train.progress=false", "data.workers=0", "data.image_size=32", "data.batch_size=8",
         "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]", "train.epochs=null", "train.steps=4",
         "train.log_every=1", "train.ckpt_every=0", "optim.lr=2e-3", "optim.warmup_steps=1", "model.drop_path=0",
         "objective.name=simmim", "objective.mask_patch_size=8", "objective.hflip=0", "engine.precision=fp32",
         "train.export=false",
         # ZeRO-3 partitions the weights and keeps only the biases whole: both kinds of parameter are gathered.
         "engine.deepspeed={zero_optimization: {stage3_param_persistence_threshold: 100}}"]


@pytest.fixture(scope="module")
def results(tmp_path_factory, digits_dir):
    tmp = tmp_path_factory.mktemp("simmim")
    data = [f"data.train={digits_dir}", "data.prepare=none"]
    cases = {f"{model}-zero{zero}": (None, [*data, *EXACT, *spec, f"engine.zero_stage={zero}"], None)
             for model, spec in (("vit", TINY_VIT), ("swin", TINY_SWIN)) for zero in (0, 3)}
    cases["vit-zero3-resumed"] = (None, [*data, *EXACT, *TINY_VIT, "engine.zero_stage=3"], 2)
    cases["swin-zero3-bf16"] = (None, [*data, *EXACT, *TINY_SWIN, "engine.zero_stage=3", "engine.precision=bf16"], None)
    result = tmp / "result.json"
    run_worker("simmim_worker", str(tmp), str(result), json.dumps(cases))
    return json.loads(result.read_text())


def losses(run: dict) -> dict[str, float]:
    return {step: values["loss"] for step, values in run["steps"].items()}


@pytest.mark.parametrize("model", ["vit", "swin"])
def test_zero0_and_zero3_give_the_same_losses(results, model):
    a, b = losses(results[f"{model}-zero0"]), losses(results[f"{model}-zero3"])
    assert sorted(a) == sorted(b) == ["1", "2", "3", "4"]
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5, (a, b)
    assert a["4"] != a["1"]  # the weights moved: the comparison covers updated models


def test_a_resumed_run_draws_the_same_masks(results):
    """The mask is drawn from the step's seed: stopped at step 2 and resumed, the losses are the same."""
    assert losses(results["vit-zero3-resumed"]) == losses(results["vit-zero3"])


def test_trains_under_bf16_and_zero3(results):
    run = results["swin-zero3-bf16"]["steps"]
    fp32 = results["swin-zero3"]["steps"]
    for step, values in run.items():
        assert abs(values["loss"] - fp32[step]["loss"]) < 0.05 * fp32[step]["loss"], (step, values, fp32[step])
        assert values["recon_masked"] == pytest.approx(values["loss"])
