"""The backbone a pre-training run's export would hold, read from one of its checkpoints: for a run
without an export (stopped, ended at ``train.stop_at``, crashed, still running).

The objective is built on the CPU from the run's ``config.yaml``, the checkpoint, verified as a
resume verifies it, is loaded into it, and the export's own choice of network is returned:
``Objective.backbone()`` (DINO's and DINOv2's teacher, MoBY's online encoder or with
``objective.export=target`` its target, the supervised and SimMIM backbones). Picking a network by
key prefix instead found the student where the export holds the teacher.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from pretrain.config import Config, ConfigError, load_config, read_recipe
from pretrain.dist import DistEnv
from pretrain.errors import CheckpointError
from pretrain.objectives.base import RunContext
from pretrain.objectives.build import build_objective
from pretrain.state.checkpoints import Checkpoints
from pretrain.state.layout import LATEST_NAME, checkpoint_identity
from pretrain.state.reading import fp32_state

CONFIG_NAME = "config.yaml"
SUMMARY_NAME = "run.json"


def is_pretraining_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a pre-training run's config (a fine-tuning stage's has more sections)."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        return False
    try:
        sections = set(read_recipe(path))
    except ConfigError:
        return False
    return sections <= {f.name for f in dataclasses.fields(Config)}


def checkpoint_backbone(run_dir: str | Path, tag: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(the exported backbone's fp32 state dict as of checkpoint ``tag``, a description of it).

    ``tag`` defaults to the checkpoint ``latest`` names. CheckpointError naming the file when the
    run's config or summary cannot be read, there is no complete checkpoint, or the checkpoint was
    not written by this config or its files changed since (size and sha256 against ``meta.json``).
    """
    run_dir = Path(run_dir)
    cfg = _config(run_dir)
    objective = _objective(cfg, run_dir)
    dist = DistEnv()  # this process alone: nothing is exchanged
    checkpoints = _PretrainedCheckpoints(run_dir, cfg.train.keep_last, dist)
    tag = tag or checkpoints.latest()
    if tag is None:
        raise CheckpointError(f"{run_dir}: no export and no complete checkpoint "
                              f"({checkpoints.directory / LATEST_NAME} is absent)")
    shapes = {name: list(p.shape) for name, p in objective.named_parameters()}
    checkpoints.verify(tag, checkpoint_identity(cfg, shapes))
    path = checkpoints.directory / tag
    state = fp32_state(checkpoints.directory, tag, buffers_of=objective)
    expected = objective.state_dict()
    try:
        # The teacher's weights are rebuilt from its saved master, as a resume rebuilds them.
        objective.load_state_dict({k: v for k, v in state.items() if k in expected})
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not hold what {run_dir / CONFIG_NAME} builds: {e}") from None
    backbone = objective.backbone()
    state = {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
             for k, v in backbone.state_dict().items()}
    name = objective.backbone_prefix().rstrip(".")
    return state, f"{name} of {path} (objective.name={cfg.objective.name}, as its export would hold it)"


class _PretrainedCheckpoints(Checkpoints):
    """A run's checkpoints read as ``pretrained=``: a refused one points to the others by path, not
    to the resume's keys."""

    def alternatives(self, refused: str | None) -> str:
        others = self.complete_tags(excluding=refused)
        if not others:
            return "the run has no other complete checkpoint"
        return (f"to read an older complete checkpoint ({', '.join(others[:5])}), give "
                f"pretrained={self.directory}/TAG")


def _config(run_dir: Path) -> Config:
    try:
        return load_config(run_dir / CONFIG_NAME)
    except ConfigError as e:
        raise CheckpointError(f"{run_dir / CONFIG_NAME}: not a pre-training run's config: {e}") from None


def _objective(cfg: Config, run_dir: Path):
    """The run's objective on the CPU, built as its trainer built it (same seed), in fp32."""
    path = run_dir / SUMMARY_NAME
    try:
        plan = json.loads(path.read_text())
        ctx = RunContext(plan["num_classes"], plan["total_steps"], plan["steps_per_epoch"], DistEnv())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot read the run's plan (num_classes, total_steps, steps_per_epoch): "
                              f"{type(e).__name__}: {e}") from None
    with torch.random.fork_rng():
        torch.manual_seed(cfg.run.seed)  # what no checkpoint holds (frozen copies) starts as the run's did
        return build_objective(cfg, ctx)
