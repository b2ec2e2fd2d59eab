"""Where a checkpoint re-sharded for another number of processes is kept: ``CHECKPOINT/universal``,
the engine's universal conversion (:func:`pretrain.engine.write_universal`), made once per checkpoint.

It is written under a temporary name and renamed when complete, so an interrupted conversion is
redone, never half-read. Every file of it is recorded (size, sha256) in ``checksums.json``; a
conversion whose files differ from their record (or that has none) is converted again from the
checkpoint, which was verified before: the conversion is derived data.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from pretrain.dist import DistEnv
from pretrain.engine import NoAdamMoments, write_universal
from pretrain.errors import CheckpointError
from pretrain.files import atomic_write
from pretrain.state.layout import META_NAME, file_checksum, verify_files

log = logging.getLogger(__name__)

UNIVERSAL_DIR = "universal"  # inside a checkpoint: its conversion
UNIVERSAL_CHECKSUMS = "checksums.json"  # inside the conversion: each file's size and sha256


def convert_to_universal(checkpoint: Path, module: nn.Module, dist: DistEnv) -> Path:
    """``CHECKPOINT/universal``, converted by rank 0 if it is not there yet or was altered (a
    collective); ``module`` is the objective whose buffers the conversion keeps whole."""
    target = checkpoint / UNIVERSAL_DIR
    if target.is_dir():
        problem = universal_problem(target, dist)
        if problem and dist.is_main:
            log.warning("%s; converting %s again", problem, checkpoint)
            shutil.rmtree(target)
        dist.barrier()
    failure = None
    if dist.is_main and not target.is_dir():
        scratch = checkpoint / f".{UNIVERSAL_DIR}.tmp{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        out = scratch / UNIVERSAL_DIR
        log.info("converting %s for another number of processes (DeepSpeed universal checkpoint)", checkpoint)
        try:
            write_universal(checkpoint, out, module)
            files = {str(f.relative_to(out)): file_checksum(f) for f in sorted(out.rglob("*")) if f.is_file()}
            atomic_write(out / UNIVERSAL_CHECKSUMS, json.dumps({"files": files}, indent=1).encode())
            os.replace(out, target)
        except CheckpointError as e:
            failure = e
        except NoAdamMoments as e:
            failure = unconvertible_error(checkpoint, e.args[0], dist.world_size)
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
