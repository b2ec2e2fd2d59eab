"""Checkpoint cadence, an atomic ``latest`` pointer, keep-last-K pruning, and backbone export.

Layout under ``RUN_DIR/checkpoints``: one DeepSpeed checkpoint directory per save (``step_00001000``)
and a ``latest`` file naming the newest complete one. ``latest`` is replaced atomically only after
every rank has finished writing, so it never names a partial checkpoint; pruning never removes
the checkpoint ``latest`` names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from pretrain.dist import DistEnv

TAG_PATTERN = re.compile(r"^step_(\d{8,})$")


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
            raise RuntimeError(f"{self.directory / 'latest'} names {tag!r}, which is not a checkpoint here")
        return tag

    def save(self, engine, step: int, client_state: dict) -> str:
        """A collective: every rank writes its share, then rank 0 points ``latest`` at it and prunes."""
        if not engine.weights_finite():
            raise RuntimeError(f"step {step}: the weights are not finite; refusing to write a checkpoint")
        tag = tag_for(step)
        if self.dist.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        engine.save(str(self.directory), tag, client_state)
        self.dist.barrier()  # every rank's files are on disk before the pointer moves
        if self.dist.is_main:
            atomic_write(self.directory / "latest", tag.encode())
            self.prune(keep=tag)
        self.dist.barrier()
        return tag

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
