"""A checkpoint read for its weights rather than resumed: by ``finetune`` (``pretrained=`` a
checkpoint directory, vitscale's or another DeepSpeed run's) and :mod:`pretrain.run_backbone`.

Every file is read weights-only (DeepSpeed's own reader included), with only the few DeepSpeed
classes its states hold allowed: a file that would unpickle anything else is refused, naming it. A
vitscale checkpoint's files are first checked against the checksums in its ``meta.json``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn as nn

from pretrain.dist import DistEnv
from pretrain.engine import (MODEL_STATES, checkpoint_fp32_weights, holds_shards, merged_buffers,
                             naming_refused_files, refused_file_error, weights_only_loading)
from pretrain.errors import CheckpointError
from pretrain.state.layout import CHECKPOINTS_DIR, LATEST_NAME, META_NAME, TORCH_FILES, read_meta, verify_files

# How a checkpoint directory is recognized, for messages about one that is not.
CHECKPOINT_FILES = f"{LATEST_NAME}, {MODEL_STATES}"


def locate(path: Path) -> tuple[Path, str | None] | None:
    """(checkpoints directory, tag) for a run dir, a checkpoints dir (tag None: the one ``latest``
    names) or one checkpoint's directory; None when ``path`` is none of them."""
    if (path / CHECKPOINTS_DIR / LATEST_NAME).is_file():
        return path / CHECKPOINTS_DIR, None
    if (path / LATEST_NAME).is_file():
        return path, None
    if holds_shards(path):
        return path.parent, path.name
    return None


def consolidated(directory: Path, tag: str | None) -> dict[str, torch.Tensor]:
    """The fp32 weights of checkpoint ``tag`` (None: the one ``latest`` names) in ``directory``,
    gathered from its ZeRO partitions; checked against its ``meta.json`` first when vitscale wrote
    it (another DeepSpeed run's has none: nothing recorded to check against)."""
    tag_dir = directory / (tag or _latest_tag(directory))
    if not tag_dir.is_dir():
        raise CheckpointError(f"{directory / LATEST_NAME} names {tag_dir.name!r}, which is not a checkpoint in "
                              f"{directory}")
    if (tag_dir / META_NAME).is_file():
        problem = verify_files(tag_dir, read_meta(tag_dir), DistEnv())
        if problem:
            raise CheckpointError(problem)
    return fp32_state(directory, tag_dir.name)


def fp32_state(directory: Path, tag: str, buffers_of: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Checkpoint ``tag``'s weights in fp32, whole, and with ``buffers_of`` the buffers of that module
    as saved, whole (a ZeRO-3 run's teacher master is saved in parts, one per rank); verified by the
    caller. CheckpointError naming a file that would run code."""
    tag_dir = directory / tag
    try:
        with weights_only_loading(), naming_refused_files():
            state = checkpoint_fp32_weights(directory, tag)
            if buffers_of is not None:
                state.update(merged_buffers(tag_dir, buffers_of))
    except pickle.UnpicklingError as e:  # a file read outside torch.load's patched name
        raise refused(tag_dir, e) from None
    return state


def refused(tag_dir: Path, error: Exception) -> CheckpointError:
    """Name the file that weights-only loading refused, where the reader did not say which it was:
    each file is opened again weights-only with its tensors memory-mapped (cheap), until one fails."""
    culprit = str(tag_dir)
    with weights_only_loading():
        for file in sorted(tag_dir.glob(TORCH_FILES)):
            try:
                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError as e:
                culprit, error = str(file), e
                break
            except Exception:  # not what is being diagnosed
                continue
    return refused_file_error(culprit, error)


def _latest_tag(directory: Path) -> str:
    """The tag ``latest`` names, as written: another DeepSpeed run's tags need not be vitscale's."""
    pointer = directory / LATEST_NAME
    try:
        return pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer}: not a readable checkpoint tag ({e})") from None
