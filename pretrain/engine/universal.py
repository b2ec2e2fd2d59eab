"""Resuming at another world size: DeepSpeed's universal checkpoint, written into the directory the
checkpointer keeps for it (:mod:`pretrain.state.conversion`: where, checksums, when to redo it) and
loaded, with the module's buffers whole."""

from __future__ import annotations

import contextlib
import io
from argparse import Namespace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from pretrain.engine.checkpoint_io import merged_buffers, naming_refused_files, weights_only_loading

if TYPE_CHECKING:
    from pretrain.engine.deepspeed_engine import Engine

BUFFERS_FILE = "buffers.pt"  # inside the conversion: the module's buffers, whole


class NoAdamMoments(Exception):
    """DeepSpeed's conversion met a param group whose optimizer state has no Adam moments; its
    argument is the bare ``KeyError`` DeepSpeed raised."""


def write_universal(checkpoint: Path, out: Path, module: nn.Module) -> None:
    """DeepSpeed's universal conversion (``ds_to_universal``) of ``checkpoint`` into ``out``, and
    ``module``'s buffers, whole (:func:`merged_buffers`), into ``out/buffers.pt``: the universal load
    reads no module buffers. Every file is read weights-only: one that would run code raises the
    CheckpointError naming it. A group without Adam moments raises :class:`NoAdamMoments`."""
    from deepspeed.checkpoint import ds_to_universal

    args = Namespace(input_folder=str(checkpoint), output_folder=str(out), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    chatter = io.StringIO()  # its progress bars and prints
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), weights_only_loading(), \
                naming_refused_files():
            ds_to_universal.main(args)
            torch.save(merged_buffers(checkpoint, module), out / BUFFERS_FILE)
    except KeyError as e:
        # A group's state without its moments, or (an index) with no state at all.
        missing = e.args[0] if e.args else None
        if missing not in ("exp_avg", "exp_avg_sq") and not isinstance(missing, int):
            raise
        raise NoAdamMoments(e) from e


def load_universal(engine: Engine, universal: Path) -> dict:
    """Load the universal conversion ``universal`` (of a ZeRO checkpoint written by another number
    of processes); returns its client state (the param groups' settings are the caller's to restore:
    :meth:`Engine.load_universal`).

    Weights and optimizer state go through DeepSpeed's ``load_checkpoint`` with
    ``checkpoint.load_universal``; that path loads no module buffers, so the buffers (a momentum
    teacher's master, DINO's centre, MoBY's queues) come from ``buffers.pt``, loaded by the module,
    which takes its own share.
    """
    ds = engine.engine
    # The documented switch is the config's ``checkpoint: {load_universal: true}``, read at load time;
    # set only for this load, since the engine is built before the run knows which checkpoint it resumes.
    ds._config.load_universal_checkpoint = True
    try:
        path, client_state = ds.load_checkpoint(str(universal.parent), tag=universal.name,
                                                load_lr_scheduler_states=False)
    finally:
        ds._config.load_universal_checkpoint = False
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the universal checkpoint {universal}")
    if hasattr(ds.optimizer, "fp32_partitioned_groups_flat"):
        restore_zero3_step_counts(ds.optimizer, universal)
    buffers = torch.load(universal / BUFFERS_FILE, map_location=engine.dist.device, weights_only=True)
    result = engine.module.load_state_dict(buffers, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"{universal / BUFFERS_FILE}: buffers this model does not have: "
                           f"{result.unexpected_keys[:5]}")
    return client_state


def restore_zero3_step_counts(zero3, universal: Path) -> None:
    """Each ZeRO-3 sub-group's own Adam step count, as saved. DeepSpeed's universal load gives every
    sub-group the first one's count, as one shared tensor that each sub-group's step then advances
    again: a frozen group (DINO's last layer, 0 steps) would come back as old as the others, and
    Adam's bias correction would be off. The conversion's ``optimizer_state.pt`` is rank 0's state,
    which holds every sub-group's count (in the order ZeRO-3's state dict lists them: by group)."""
    saved = torch.load(universal / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=True, mmap=True)
    states = saved["optimizer_state_dict"]["state"]
    groups = zero3.sub_group_to_group_id
    listed = sorted(range(len(zero3.fp32_partitioned_groups_flat)), key=lambda sub_group: groups[sub_group])
    base = zero3.optimizer
    for index, sub_group in enumerate(listed):
        flat = zero3.fp32_partitioned_groups_flat[sub_group]
        step = states.get(index, {}).get("step")
        if step is not None and flat in base.state:
            base.state[flat]["step"] = step.clone() if torch.is_tensor(step) else step
