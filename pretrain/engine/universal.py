"""Resuming at another world size: DeepSpeed's universal checkpoint, converted once per checkpoint
and loaded with the module's buffers, whole."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
from argparse import Namespace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from pretrain.checkpoint import META_NAME, CheckpointError, file_checksum, verify_files
from pretrain.dist import DistEnv
from pretrain.engine.checkpoint_io import merged_buffers, naming_refused_files
from pretrain.files import atomic_write

if TYPE_CHECKING:
    from pretrain.engine.deepspeed_engine import Engine

log = logging.getLogger(__name__)


UNIVERSAL_DIR = "universal"  # inside a checkpoint: its DeepSpeed universal conversion
BUFFERS_FILE = "buffers.pt"  # inside the conversion: the module's buffers, whole
UNIVERSAL_CHECKSUMS = "checksums.json"  # inside the conversion: each file's size and sha256


def load_resharded(engine: Engine, checkpoint: Path) -> dict:
    """Load a ZeRO checkpoint written by another number of processes; returns its client state
    (the param groups' settings are the caller's to restore: :meth:`Engine.load`).

    Weights and optimizer state go through DeepSpeed's universal checkpoint (``ds_to_universal``,
    then ``load_checkpoint`` with ``checkpoint.load_universal``), converted once into
    ``CHECKPOINT/universal``. That path loads no module buffers, so the buffers (a momentum
    teacher's master, DINO's centre, MoBY's queues) come from ``buffers.pt``, written whole by the
    conversion (:func:`merged_buffers`) and loaded by the module, which takes its own share.
    """
    universal = convert_to_universal(checkpoint, engine.module, engine.dist)
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


def convert_to_universal(checkpoint: Path, module: nn.Module, dist: DistEnv) -> Path:
    """``CHECKPOINT/universal``, converted by rank 0 if it is not there yet (a collective).

    Written under a temporary name and renamed when complete, so an interrupted conversion is
    redone, never half-read. Every file of it is recorded (size, sha256) in ``checksums.json``;
    a conversion whose files differ from their record (or that has none) is converted again from
    the checkpoint, which was verified before: the conversion is derived data."""
    target = checkpoint / UNIVERSAL_DIR
    if target.is_dir():
        problem = universal_problem(target, dist)
        if problem and dist.is_main:
            log.warning("%s; converting %s again", problem, checkpoint)
            shutil.rmtree(target)
        dist.barrier()
    failure = None
    if dist.is_main and not target.is_dir():
        from deepspeed.checkpoint import ds_to_universal

        scratch = checkpoint / f".{UNIVERSAL_DIR}.tmp{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        out = scratch / UNIVERSAL_DIR
        args = Namespace(input_folder=str(checkpoint), output_folder=str(out), num_extract_workers=1,
                         num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        log.info("converting %s for another number of processes (DeepSpeed universal checkpoint)", checkpoint)
        try:
            chatter = io.StringIO()  # its progress bars and prints
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), naming_refused_files():
                ds_to_universal.main(args)
                torch.save(merged_buffers(checkpoint, module), out / BUFFERS_FILE)
            files = {str(f.relative_to(out)): file_checksum(f) for f in sorted(out.rglob("*")) if f.is_file()}
            atomic_write(out / UNIVERSAL_CHECKSUMS, json.dumps({"files": files}, indent=1).encode())
            os.replace(out, target)
        except CheckpointError as e:
            failure = e
        except KeyError as e:
            # A group's state without its moments, or (an index) with no state at all.
            missing = e.args[0] if e.args else None
            if missing not in ("exp_avg", "exp_avg_sq") and not isinstance(missing, int):
                raise
            failure = unconvertible_error(checkpoint, e, dist.world_size)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    # Every rank learns whether rank 0 converted it (a barrier that cannot leave the others waiting).
    failed = dist.all_reduce(torch.tensor(float(failure is not None), device=dist.device), "max").item()
    if failure is not None:
        raise failure
    if failed:
        raise CheckpointError(f"{checkpoint}: rank 0 refused it while converting it for another number of "
                              f"processes (its error names the file)")
    return target


def unconvertible_error(checkpoint: Path, error: KeyError, world_size: int) -> CheckpointError:
    """The error for a checkpoint whose optimizer state lacks the Adam moments of a param group that
    had not stepped when it was saved (DINO's frozen last layer): written before SkipAndFreeze gave
    such groups their first state. DeepSpeed's conversion raises a bare ``KeyError: 'exp_avg'``."""
    try:
        saved = json.loads((checkpoint / META_NAME).read_text()).get("world_size")
    except (OSError, ValueError):
        saved = None
    original = f"its original {saved} processes" if saved else "the number of processes that wrote it"
    return CheckpointError(f"{checkpoint}: cannot be converted for {world_size} processes: its optimizer state has "
                           f"no Adam moments (KeyError: {error}) for a param group that had not stepped yet (a checkpoint "
                           f"written before vitscale saved them). Resume it once on {original} (its next "
                           f"checkpoint converts), then on {world_size}")


def universal_problem(universal: Path, dist: DistEnv) -> str | None:
    """Why the conversion ``universal`` is not as it was written, or None (a collective: the ranks
    share the hashing)."""
    try:
        recorded = json.loads((universal / UNIVERSAL_CHECKSUMS).read_text())
    except (OSError, ValueError) as e:
        return f"{universal / UNIVERSAL_CHECKSUMS}: no record of the conversion's files ({e})"
    return verify_files(universal, recorded, dist, UNIVERSAL_CHECKSUMS, "conversion")


