"""DINOv2 on 2 processes: Sinkhorn-Knopp over 2 processes equals 1 process on the joined batch;
ZeRO-0 and ZeRO-3 give the same losses, a run stopped and resumed the same as an uninterrupted one
(teacher, both EMA centres, mask token, masks drawn from the step's seed), and the exported teacher
backbone loads into timm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.dist import DistEnv
from pretrain.objectives.dinov2 import sinkhorn_knopp
from tests.conftest import REPO, TINY_VIT, load_export, run_worker
from tests.helpers import ZERO3_SMALL_PERSISTENCE
from tests.integration.dinov2_worker import SINKHORN_SPLIT, sinkhorn_logits

pytestmark = pytest.mark.slow

EXACT = [*TINY_VIT, "model.kwargs.dynamic_img_size=true", "run.threads=1", "train.progress=false", "data.workers=0",
         "data.image_size=32", "data.batch_size=8", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]",
         "train.epochs=null", "train.steps=3", "train.log_every=1", "train.ckpt_every=0", "optim.lr=2e-3",
         "optim.warmup_steps=1", "model.drop_path=0", "engine.precision=fp32", "objective.name=dinov2",
         "objective.out_dim=64", "objective.ibot_out_dim=48",
         "objective.hidden_dim=32", "objective.bottleneck_dim=16", "objective.local_crops=2",
         "objective.local_size=16", "objective.freeze_last_layer_epochs=0", "objective.momentum=0.9",
         ZERO3_SMALL_PERSISTENCE]


@pytest.fixture(scope="module")
def results(tmp_path_factory, digits_dir):
    tmp = tmp_path_factory.mktemp("dinov2")
    data = [f"data.train={digits_dir}", "data.prepare=none"]
    cases = {"zero0": (None, [*data, *EXACT, "engine.zero_stage=0", "train.export=false"], None),
             "zero3": (None, [*data, *EXACT, "engine.zero_stage=3", "train.export=true"], None),
             "zero3-resumed": (None, [*data, *EXACT, "engine.zero_stage=3", "train.export=false"], 2),
             # Written with the prototypes frozen by skipping (the groups of a checkpoint from before
             # freeze_last_layer_by existed: freeze_steps, no Adam state), resumed with DINOv2's lr 0.
             "skip-resumed-zero-lr": (None, [*data, *EXACT, "engine.zero_stage=2", "train.export=false",
                                             "objective.freeze_last_layer_steps=3"], 1,
                                      ["objective.freeze_last_layer_by=zero_lr"])}
    result = tmp / "result.json"
    run_worker("dinov2_worker", str(tmp), str(result), json.dumps(cases))
    return {**json.loads(result.read_text()), "tmp": str(tmp)}


def test_sinkhorn_knopp_on_two_processes_equals_one_process_on_the_joined_batch(results):
    parts = [torch.load(Path(results["tmp"]) / f"sinkhorn.{rank}.pt", weights_only=True) for rank in range(2)]
    assert [len(p) for p in parts] == [SINKHORN_SPLIT, 16 - SINKHORN_SPLIT]
    torch.testing.assert_close(torch.cat(parts), sinkhorn_knopp(sinkhorn_logits(), 0.07, DistEnv()))


def test_zero0_and_zero3_give_the_same_losses_and_the_export_loads_in_timm(results):
    a, b = (results[z]["steps"] for z in ("zero0", "zero3"))
    assert sorted(a) == sorted(b) == ["1", "2", "3"]
    for step in a:
        for key in ("loss", "dino_loss", "ibot_loss", "koleo_loss"):
            assert abs(a[step][key] - b[step][key]) < 1e-5, (step, key, a[step], b[step])
    assert a["3"]["loss"] != a["1"]["loss"]  # the weights moved: the comparison covers updated models
    assert all(0 < a[s]["masked_ratio"] < 0.5 and a[s]["ibot_loss"] > 0 for s in a)
    meta, weights, model = load_export(REPO / results["zero3"]["dir"])
    assert meta["objective"] == "dinov2"
    assert not any("mask_token" in k or "head." in k for k in weights)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, meta["kwargs"]["embed_dim"])


def test_a_resumed_run_continues_exactly(results):
    """Stopped after step 2 and resumed: step 3 (teacher, centres, masks) as if never stopped."""
    resumed, whole = results["zero3-resumed"]["steps"], results["zero3"]["steps"]
    assert sorted(resumed) == ["1", "2", "3"]
    assert {s: v["loss"] for s, v in resumed.items()} == {s: v["loss"] for s, v in whole.items()}


def test_a_checkpoint_frozen_by_skipping_resumes_with_the_configs_zero_lr_freeze(results):
    """The config's freeze, not the checkpoint's: after the resume the prototypes' groups step at
    lr 0 and their Adam moments follow their gradients (2 steps), from no state in the checkpoint."""
    resumed = results["skip-resumed-zero-lr"]
    assert sorted(resumed["steps"]) == ["1", "2", "3"]
    frozen = [g for g in resumed["groups"] if g["zero_lr_steps"]]
    assert frozen and all(g["zero_lr_steps"] == 3 and g["lr"] == 0.0 and g["adam_steps"] == 2 for g in frozen), \
        resumed["groups"]
    assert not any(g["freeze_steps"] for g in resumed["groups"]), resumed["groups"]
    assert all(g["adam_steps"] == 3 and g["lr"] > 0 for g in resumed["groups"] if not g["zero_lr_steps"])
