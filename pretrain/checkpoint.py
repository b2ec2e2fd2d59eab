"""Checkpoint cadence, an atomic ``latest`` pointer, keep-last-K pruning, and backbone export.

Layout under ``RUN_DIR/checkpoints``: one DeepSpeed checkpoint directory per save (``step_00001000``)
holding also ``meta.json`` (what wrote it: objective, model, parameter shapes), and a ``latest`` file
naming the newest complete one. ``latest`` is replaced atomically only after every rank has
finished writing, so it never names a partial checkpoint; pruning never removes the checkpoint
``latest`` names. Before a resume, :meth:`Checkpoints.verify` checks the files and the meta data, so
a truncated file or another run's checkpoint is refused before anything is loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import zipfile

import torch
from safetensors.torch import save_file

from pretrain.dist import DistEnv
from pretrain.faults import maybe_die

TAG_PATTERN = re.compile(r"^step_(\d{8,})$")
META_NAME = "meta.json"
FULL_BELOW_BYTES = 64 << 20  # a failed save with less room than this left is reported as a full disk


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or must not be loaded; the message names the file."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class Checkpoints:
    def __init__(self, run_dir: str | Path, keep_last: int, dist: DistEnv) -> None:
        self.directory = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.dist = dist

    def latest(self) -> str | None:
        """The newest complete checkpoint's tag, or None for a fresh run."""
        try:
            tag = (self.directory / "latest").read_text().strip()
        except FileNotFoundError:
            return None
        if not TAG_PATTERN.match(tag) or not (self.directory / tag).is_dir():
            raise CheckpointError(f"{self.directory / 'latest'} names {tag!r}, which is not a checkpoint here")
        return tag

    def save(self, engine, step: int, client_state: dict, meta: dict) -> str:
        """A collective: every rank writes its share, then rank 0 points ``latest`` at it and prunes.

        ``meta`` (JSON) describes what wrote the checkpoint; :meth:`verify` compares it on resume.
        A failed write (a full disk) raises CheckpointError and removes this save's directory;
        ``latest`` keeps naming the previous checkpoint.
        """
        if not engine.weights_finite():
            raise CheckpointError(f"step {step}: the weights are not finite; refusing to write a checkpoint")
        tag, rank = tag_for(step), self.dist.rank
        path = self.directory / tag
        if self.dist.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            if path.exists() and tag != self.latest():  # left by a save that was interrupted
                shutil.rmtree(path)
        self.dist.barrier()
        maybe_die("save-before-write", rank, step)
        try:
            engine.save(str(self.directory), tag, client_state)
            if self.dist.is_main:
                atomic_write(path / META_NAME, json.dumps(meta, indent=1).encode())
        except Exception as e:  # torch reports a full disk as a RuntimeError ("unexpected pos"), the OS as an OSError
            free = shutil.disk_usage(self.directory).free
            full = f" (the file system is full: {free} bytes free)" if free < FULL_BELOW_BYTES else ""
            shutil.rmtree(path, ignore_errors=True)
            raise CheckpointError(f"rank {rank} could not write checkpoint {path}{full}: {e}\n"
                                  f"{self.directory / 'latest'} still names the last complete checkpoint, "
                                  f"{self.latest() or 'none'}") from e
        maybe_die("save-after-write", rank, step)
        self.dist.barrier()  # every rank's files are on disk before the pointer moves
        maybe_die("save-before-latest", rank, step)
        if self.dist.is_main:
            atomic_write(self.directory / "latest", tag.encode())
            self.prune(keep=tag)
        self.dist.barrier()
        return tag

    def verify(self, tag: str, meta: dict) -> None:
        """CheckpointError unless checkpoint ``tag`` is whole and was written by a run like this one
        (``meta`` as this run would save it); reads only the meta data and file headers."""
        path = self.directory / tag
        meta = json.loads(json.dumps(meta))  # tuples as lists, as they were saved
        try:
            saved = json.loads((path / META_NAME).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path / META_NAME}: cannot read what wrote this checkpoint ({e}); "
                                  f"it is not a complete vitscale checkpoint") from None
        for file in sorted(path.glob("*.pt")):
            if not zipfile.is_zipfile(file):  # torch.save's format; a cut-off file loses its zip directory
                raise CheckpointError(f"{file}: truncated or corrupt ({file.stat().st_size} bytes); to resume from "
                                      f"an older checkpoint, write its tag into {self.directory / 'latest'}")
        for key in ("objective", "model", "model_kwargs", "image_size"):
            if saved.get(key) != meta.get(key):
                raise CheckpointError(f"{path / META_NAME}: written with {key} {saved.get(key)!r}, this run has "
                                      f"{meta.get(key)!r}; use another run.dir or train.resume=false")
        theirs, ours = saved.get("parameters", {}), meta.get("parameters", {})
        if theirs != ours:
            differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
            listed = "; ".join(f"{k}: {theirs.get(k, 'absent')} vs {ours.get(k, 'absent')}" for k in differ[:5])
            raise CheckpointError(f"{path / META_NAME}: {len(differ)} parameters differ (checkpoint vs this run: "
                                  f"{listed}); use another run.dir or train.resume=false")

    def prune(self, keep: str) -> None:
        """Keep the newest ``keep_last`` checkpoints up to ``keep``; drop older ones and any newer
        leftovers of an interrupted save (the run resumed before them and will write them again)."""
        tags = sorted(d.name for d in self.directory.iterdir() if d.is_dir() and TAG_PATTERN.match(d.name))
        complete = [t for t in tags if t <= keep]
        survivors = set(complete[-self.keep_last:]) | {keep}
        for tag in tags:
            if tag not in survivors:
                shutil.rmtree(self.directory / tag, ignore_errors=True)


def export_backbone(state_dict: dict[str, torch.Tensor], out_dir: str | Path, model_name: str,
                    model_kwargs: dict, extra: dict | None = None) -> Path:
    """Write ``backbone.safetensors`` (timm state-dict format) and ``backbone.json`` (how to build it)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "backbone.safetensors"
    tmp = out_dir / ".backbone.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata={"model": model_name})
    os.replace(tmp, weights)
    meta = {"model": model_name, "kwargs": model_kwargs, "weights": weights.name, **(extra or {})}
    atomic_write(out_dir / "backbone.json", json.dumps(meta, indent=1).encode())
    return weights
