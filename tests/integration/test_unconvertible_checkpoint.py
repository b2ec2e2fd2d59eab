"""A ZeRO checkpoint saved inside DINO's frozen window before a frozen param group got its first Adam
state cannot be converted for another number of processes: the resume says which checkpoint and what
to do, instead of DeepSpeed's bare ``KeyError: 'exp_avg'``."""

from __future__ import annotations

import re

import pytest
import torch

from pretrain.dist import DistEnv
from pretrain.engine import weights_only_loading
from pretrain.errors import CheckpointError
from pretrain.state.conversion import UNIVERSAL_DIR, convert_to_universal
from pretrain.state.layout import tag_for
from tests.conftest import run_module
from tests.helpers import RUN_DINO

RUN = ["run.threads=1", "train.progress=false", "data.workers=0", "data.synthetic=true", "data.num_classes=10",
       "data.image_size=32", "data.batch_size=8", "data.train_samples=64", "train.ckpt_every=0",
       "engine.precision=fp32", *RUN_DINO, "objective.freeze_last_layer_epochs=1", "engine.zero_stage=2",
       "train.steps=16", "train.stop_at=2"]  # stopped inside the first epoch: the last layer is frozen


@pytest.mark.parametrize("saved_state", [{}, None], ids=["empty-state", "no-state"])
def test_a_checkpoint_saved_without_a_frozen_groups_moments_is_refused_saying_how_to_convert_it(tmp_path,
                                                                                                saved_state):
    run_module("pretrain", *RUN, f"run.dir={tmp_path}")
    checkpoint = tmp_path / "checkpoints" / tag_for(2)
    optimizer_file = checkpoint / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with weights_only_loading():
        saved = torch.load(optimizer_file, map_location="cpu", weights_only=True)
    adam = saved["optimizer_state_dict"]["base_optimizer_state"]
    frozen = [i for i, group in enumerate(adam["param_groups"]) if group.get("frozen")]
    assert frozen and all("exp_avg" in adam["state"][i] for i in frozen)  # as vitscale saves it now
    for i in frozen:  # as it was saved before: an empty state, or none
        if saved_state is None:
            del adam["state"][i]
        else:
            adam["state"][i] = saved_state
    torch.save(saved, optimizer_file)

    with pytest.raises(CheckpointError, match=re.escape(f"{checkpoint}: cannot be converted for 1 processes: its "
                                                        f"optimizer state has no Adam moments (KeyError: ") +
                       r".*Resume it once on its original 1 processes \(its next checkpoint converts\), then on 1$"):
        convert_to_universal(checkpoint, torch.nn.Module(), DistEnv())
    assert not (checkpoint / UNIVERSAL_DIR).exists()
    assert sorted(p.name for p in checkpoint.iterdir()) == ["meta.json", "mp_rank_00_model_states.pt",
                                                             optimizer_file.name]
