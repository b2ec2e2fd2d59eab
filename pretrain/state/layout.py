"""The names of a run's checkpoints on disk, and the checksums that prove their files whole.

Layout under ``RUN_DIR/checkpoints``: one directory per save (``step_00001000``) holding the engine's
shards (their names are the engine's: :mod:`pretrain.engine.checkpoint_io`) and ``meta.json`` (what
wrote it: objective, model, parameter shapes, world size, and the size and sha256 of every file); a
``latest`` file naming the newest complete one; inside a checkpoint, ``universal/`` when it was
re-sharded for another number of processes (:mod:`pretrain.state.conversion`). The rest of
:mod:`pretrain.state` builds on these names: :mod:`~pretrain.state.checkpoints` writes and verifies
checkpoints, :mod:`~pretrain.state.reading` reads one for its weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from pretrain.errors import CheckpointError

if TYPE_CHECKING:  # only its methods are called: the launcher reads the layout without importing torch
    from pretrain.dist import DistEnv

log = logging.getLogger(__name__)

TAG_PATTERN = re.compile(r"^step_(\d{8,})$")
META_NAME = "meta.json"
LATEST_NAME = "latest"
CHECKPOINTS_DIR = "checkpoints"  # inside a run dir
TORCH_FILES = "*.pt"  # every file a save writes besides meta.json (the engine's shards)
HASH_CHUNK_BYTES = 16 << 20


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    """The step checkpoint ``tag`` was saved after (``tag_for``'s inverse)."""
    return int(TAG_PATTERN.match(tag).group(1))


def checkpoint_identity(cfg, parameter_shapes: dict[str, list[int]]) -> dict:
    """What a checkpoint's ``meta.json`` must match to be loaded into the objective that ``cfg`` builds,
    whose parameters have ``parameter_shapes`` (see :meth:`Checkpoints.verify`)."""
    return {"objective": cfg.objective.name, "model": cfg.model.name, "model_kwargs": cfg.model.kwargs,
            "image_size": cfg.data.image_size, "parameters": parameter_shapes}


def read_meta(tag_dir: Path) -> dict:
    """The ``meta.json`` of checkpoint directory ``tag_dir``; CheckpointError naming it when unreadable."""
    try:
        return json.loads((tag_dir / META_NAME).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{tag_dir / META_NAME}: unreadable ({e})") from None


def latest_meta(directory: Path) -> tuple[str, dict] | None:
    """(tag, meta data) of the checkpoint ``latest`` names in ``directory``, unverified: a look before
    the run starts. None when there is none or it cannot be read (the resume itself reports why)."""
    try:
        tag = (directory / LATEST_NAME).read_text().strip()
        return tag, json.loads((directory / tag / META_NAME).read_text())
    except (OSError, ValueError):
        return None


def file_checksum(path: Path) -> dict:
    """``{"bytes": size, "sha256": hex digest}`` of ``path``, read in chunks (ZeRO shards can be GBs)."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK_BYTES)
    view = memoryview(buffer)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            size += n
    return {"bytes": size, "sha256": digest.hexdigest()}


def check_file(path: Path, recorded: dict, record: str = META_NAME, owner: str = "checkpoint") -> str | None:
    """Why ``path`` is not the file recorded when it was written (``file_checksum``'s dict, kept in
    the ``owner``'s ``record`` file), or None."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path}: missing (the {owner}'s {record} lists it, {recorded['bytes']} bytes)"
    if size != recorded["bytes"]:
        return f"{path}: truncated or corrupt ({size} bytes, {recorded['bytes']} when it was written)"
    if file_checksum(path)["sha256"] != recorded["sha256"]:
        return (f"{path}: corrupt: its sha256 differs from the one recorded in {record} when it was "
                f"written (bytes changed on disk)")
    return None


def verify_files(path: Path, saved_meta: dict, dist: DistEnv, record: str = META_NAME,
                 owner: str = "checkpoint") -> str | None:
    """Why the files of directory ``path`` are not those its ``record`` file (``saved_meta``: a
    checkpoint's ``meta.json``, or the ``owner`` that wrote another record) lists, or None. Every listed
    file is checked (the ranks share the hashing: a collective, all ranks get the same answer); a
    ``*.pt`` file it does not list is refused too. A checkpoint written before vitscale recorded
    checksums only has its files checked for torch's complete zip format."""
    files = saved_meta.get("files")
    if files is None:
        if dist.is_main:
            log.warning("%s: no checksums recorded (written by an older vitscale); files checked for "
                        "completeness only", path / record)
        for file in sorted(path.glob(TORCH_FILES)):
            if not zipfile.is_zipfile(file):  # torch.save's format; a cut-off file loses its zip directory
                return f"{file}: truncated or corrupt ({file.stat().st_size} bytes)"
        return None
    malformed = not isinstance(files, dict) or any(
        not isinstance(r, dict) or not isinstance(r.get("bytes"), int) or not isinstance(r.get("sha256"), str)
        for r in files.values())
    if malformed:
        return f"{path / record}: its \"files\" entry does not give a size and a sha256 for every file"
    unlisted = sorted(set(p.name for p in path.glob(TORCH_FILES)) - set(files))
    if unlisted:
        return f"{path / unlisted[0]}: not written by this {owner}'s save (its {record} does not list it)"
    names = sorted(files)
    mine = next((p for p in (check_file(path / n, files[n], record, owner) for n in names[dist.rank::dist.world_size])
                 if p), None)
    return next((p for p in dist.gather_objects(mine) if p), None)
