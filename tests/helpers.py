"""Pieces several test files share (fixtures and run settings live in conftest.py): tiny objective
configs, building an objective without an engine, a worker's last words, a view that decodes nothing."""

from __future__ import annotations

import json

import torch

from pretrain.config import load_config
from pretrain.dist import DistEnv, exit_without_teardown, leave_process_group
from pretrain.objectives.base import RunContext
from pretrain.objectives.build import build_objective
from tests.conftest import TINY_SWIN, TINY_VIT

# -- configs ------------------------------------------------------------------------------------------
# The self-supervised objectives on conftest's tiny models, small enough for unit tests.
TINY_DINO = [*TINY_VIT, "model.kwargs.dynamic_img_size=true", "objective.name=dino", "objective.out_dim=32",
             "objective.hidden_dim=16", "objective.bottleneck_dim=8", "objective.local_crops=2",
             "objective.local_size=16"]
TINY_DINOV2 = [*TINY_DINO, "objective.name=dinov2", "objective.ibot_out_dim=24",
               "objective.freeze_last_layer_epochs=0"]
TINY_MOBY = [*TINY_SWIN, "objective.name=moby", "objective.proj_dim=8", "objective.hidden_dim=16",
             "objective.queue_size=12"]

# Those the multi-process runs train (a fast teacher: momentum 0.9); a low persistence threshold, so
# that ZeRO-3 partitions the weights and keeps the biases whole: both kinds of teacher parameter.
ZERO3_SMALL_PERSISTENCE = "engine.deepspeed={zero_optimization: {stage3_param_persistence_threshold: 100}}"
RUN_DINO = ["objective.name=dino", *TINY_VIT, "model.kwargs.dynamic_img_size=true", "objective.out_dim=64",
            "objective.hidden_dim=48", "objective.bottleneck_dim=16", "objective.local_crops=2",
            "objective.local_size=16", "objective.momentum=0.9", "objective.freeze_last_layer_epochs=0"]
RUN_MOBY = ["objective.name=moby", *TINY_SWIN, "objective.proj_dim=16", "objective.hidden_dim=32",
            "objective.queue_size=48", "objective.momentum=0.9"]
# The resume tests' runs: DINO on ZeRO-3 and MoBY (exporting its target) on ZeRO-2.
RESUME_DINO = [*RUN_DINO, "engine.zero_stage=3", ZERO3_SMALL_PERSISTENCE]
RESUME_MOBY = [*RUN_MOBY, "engine.zero_stage=2", "objective.export=target"]


def synthetic_config(*overrides: str):
    """A config that reads no data and trains one step (before ``overrides``)."""
    return load_config(None, ["data.synthetic=true", "train.steps=1", *overrides])


def tiny_config(tmp_path, *overrides: str):
    """A 10-step fp32 config on synthetic 32x32 images in batches of 4, run in ``tmp_path``."""
    return synthetic_config("data.image_size=32", "data.batch_size=4", "train.steps=10", f"run.dir={tmp_path}",
                            "engine.precision=fp32", *overrides)


def tiny_objective(cfg, steps_per_epoch: int = 4, total_steps: int = 10):
    """``cfg``'s objective alone (no engine), in one process, for 10 classes."""
    return build_objective(cfg, RunContext(num_classes=10, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                                           dist=DistEnv(), precision=cfg.engine.precision))


# -- workers ------------------------------------------------------------------------------------------
def finish_worker(dist, result_path, results: dict) -> None:
    """The main rank writes ``results`` as JSON to ``result_path``; then the worker ends (:func:`end_worker`)."""
    if dist.is_main:
        with open(result_path, "w") as f:
            json.dump(results, f)
    end_worker()


def end_worker() -> None:
    """All ranks leave the process group together, then exit at once with status 0, skipping the
    interpreter's teardown (pretrain.dist.exit_without_teardown: DeepSpeed keeps gloo's process group
    alive into it, where it can abort after the results are written). These workers check what is
    on disk by then; stages exit the same way."""
    leave_process_group()
    exit_without_teardown(0)


# -- data ---------------------------------------------------------------------------------------------
class KeyOnlyView:
    """A view that decodes nothing: tests of the split, order and faults of the stream look only
    at the keys (and at a header read where the sample is damaged)."""

    decodes_itself = True

    def __call__(self, image):
        return {"image": torch.zeros(1)}
