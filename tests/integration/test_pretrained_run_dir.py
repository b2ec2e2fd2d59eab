"""``pretrained=`` a DINO or MoBY run dir that has no export yet gives the network its export would
hold (DINO's teacher, MoBY's online encoder), not the other one beside it (by key prefix, DINO's
student and MoBY's momentum target were found)."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from safetensors.torch import load_file

from finetune import weights
from pretrain.state.layout import tag_for
from pretrain.engine import weights_only_loading, zero_checkpoint_fp32_weights
from tests.conftest import flip_bytes, run_module
from tests.helpers import RESUME_DINO, RUN_MOBY

COMMON = ["run.threads=1", "train.progress=false", "data.workers=0", "data.synthetic=true", "data.image_size=32",
          "data.batch_size=8", "data.num_classes=10", "train.log_every=1", "train.ckpt_every=0", "optim.lr=0.01",
          "engine.precision=fp32"]
STOP = 2


@pytest.mark.parametrize("objective, other", [(RESUME_DINO, "student.backbone."),  # ZeRO-3
                                              ([*RUN_MOBY, "engine.zero_stage=2"], "target.nets.encoder.")],
                         ids=["dino", "moby"])
def test_a_run_without_an_export_gives_the_network_its_export_holds(tmp_path, objective, other):
    run_dir = tmp_path / "run"
    run = [*COMMON, *objective, f"run.dir={run_dir}"]
    run_module("pretrain", *run, "train.steps=4", f"train.stop_at={STOP}")
    assert not (run_dir / "export").exists()  # stopped before its export
    name, kwargs = weights.describe(run_dir)
    model_keys = set(timm.create_model(name, **kwargs).state_dict())  # what finetune loads into
    loaded = weights.load(run_dir, model_keys).state_dict

    # The same run exported from that checkpoint: resumed with train.steps at the step it stopped.
    run_module("pretrain", *run, f"train.steps={STOP}")
    exported = load_file(str(run_dir / "export" / "backbone.safetensors"))
    assert set(loaded) == set(exported)
    for key, value in exported.items():
        assert torch.equal(loaded[key], value), key
    from_checkpoints = weights.load(run_dir / "checkpoints", model_keys).state_dict  # past the export now
    assert all(torch.equal(from_checkpoints[key], value) for key, value in exported.items())

    with weights_only_loading():
        consolidated = zero_checkpoint_fp32_weights(run_dir / "checkpoints", tag_for(STOP))
    other = {k[len(other):]: v for k, v in consolidated.items() if k.startswith(other)}
    assert set(other) == set(exported)
    assert any(not torch.equal(other[key], value) for key, value in exported.items())  # the other network

    damaged = sorted((run_dir / "checkpoints" / tag_for(STOP)).glob("*model_states.pt"))[0]
    flip_bytes(damaged)  # refused as a resume refuses it, naming the file
    with pytest.raises(weights.WeightsError, match=f"^{re.escape(str(damaged))}: corrupt: its sha256 differs .*; "
                                                   f"the run has no other complete checkpoint$"):
        weights.load(run_dir / "checkpoints", model_keys)
