"""A run's checkpoints directory: when a save is due, how it is written whole, which one to resume.

``meta.json`` and then ``latest`` are written only after every rank has finished writing its shards,
so ``latest`` never names a partial checkpoint; pruning never removes the checkpoint ``latest``
names. Before a resume, :meth:`Checkpoints.verify` checks the meta data and every file against its
checksum, so a truncated or altered file or another run's checkpoint is refused before anything is
loaded. What goes into a checkpoint, and into whom it is loaded, is :mod:`pretrain.state.checkpointer`'s.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from pretrain import hooks
from pretrain.dist import DistEnv
from pretrain.errors import CheckpointError
from pretrain.files import atomic_write
from pretrain.state.layout import (CHECKPOINTS_DIR, LATEST_NAME, META_NAME, TAG_PATTERN, file_checksum, tag_for,
                                   verify_files)

log = logging.getLogger(__name__)

FULL_BELOW_BYTES = 64 << 20  # a failed save with less room than this left is reported as a full disk


class Checkpoints:
    def __init__(self, run_dir: str | Path, keep_last: int, dist: DistEnv, every: int = 0) -> None:
        """``every``: ``train.ckpt_every`` (0: only on stop requests and at the end)."""
        self.directory = Path(run_dir) / CHECKPOINTS_DIR
        self.keep_last = keep_last
        self.dist = dist
        self.every = every
        self.saved_step: int | None = None  # the step of the newest checkpoint this run saved or resumed from

    def due(self, step: int, stop_requested: bool = False, last: bool = False) -> bool:
        """Whether to save after ``step``: every ``every`` steps, when the ranks agreed to stop, and
        at the ``last`` step of an invocation unless that step is saved already."""
        if last:
            return step != self.saved_step
        return stop_requested or bool(self.every and step % self.every == 0)

    def latest(self) -> str | None:
        """The newest complete checkpoint's tag, or None for a fresh run."""
        pointer = self.directory / LATEST_NAME
        try:
            tag = pointer.read_bytes().decode("utf-8").strip()
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            raise CheckpointError(f"{pointer}: not a checkpoint tag (not UTF-8 text); "
                                  f"{self.alternatives(None)}") from None
        if not TAG_PATTERN.match(tag) or not (self.directory / tag).is_dir():
            raise CheckpointError(f"{pointer} names {tag!r}, which is not a checkpoint here; "
                                  f"{self.alternatives(None)}")
        return tag

    def save(self, engine, step: int, client_state: dict, meta: dict) -> str:
        """A collective: every rank has ``engine`` write its shards (with ``client_state``) and
        checksums them; rank 0 then writes ``meta.json`` (``meta`` and every file's checksum), points
        ``latest`` at the checkpoint and prunes.

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
        hooks.fire("save-before-write", rank=rank, step=step)
        try:
            written = engine.save(str(self.directory), tag, client_state)
            # Hashed by the rank that wrote them, while they are likely still in its page cache.
            checksums = {Path(f).name: file_checksum(Path(f)) for f in written}
        except Exception as e:  # torch reports a full disk as a RuntimeError ("unexpected pos"), the OS as an OSError
            raise self._failed_write(path, e) from e
        hooks.fire("save-after-write", rank=rank, step=step)
        every_rank = self.dist.gather_objects(checksums)  # also: every rank's files are on disk
        hooks.fire("save-before-latest", rank=rank, step=step)
        if self.dist.is_main:
            files = {name: record for part in every_rank for name, record in part.items()}
            try:
                atomic_write(path / META_NAME, json.dumps({**meta, "files": dict(sorted(files.items()))},
                                                          indent=1).encode())
            except OSError as e:
                raise self._failed_write(path, e) from e
            atomic_write(self.directory / LATEST_NAME, tag.encode())
            self.prune(keep=tag)
        self.dist.barrier()
        self.saved_step = step
        return tag

    def _failed_write(self, path: Path, error: Exception) -> CheckpointError:
        """The error for a save that failed on this rank, after removing its directory."""
        free = shutil.disk_usage(self.directory).free
        full = f" (the file system is full: {free} bytes free)" if free < FULL_BELOW_BYTES else ""
        shutil.rmtree(path, ignore_errors=True)
        return CheckpointError(f"rank {self.dist.rank} could not write checkpoint {path}{full}: {error}\n"
                               f"{self.directory / LATEST_NAME} still names the last complete checkpoint, "
                               f"{self.latest() or 'none'}")

    def meta(self, tag: str) -> dict:
        """The meta data checkpoint ``tag`` was saved with (read after :meth:`resumable` verified it)."""
        return json.loads((self.directory / tag / META_NAME).read_text())

    def resumable(self, meta: dict, fallback: str | None = None) -> str | None:
        """The checkpoint to resume from, verified (a collective): the one ``latest`` names, or None
        for a fresh run. Only when that one is refused (or ``latest`` is unreadable or absent) and
        ``fallback`` (``train.resume_from``) names another, that one is verified and ``latest`` is
        pointed at it, so the run continues from there; the checkpoints after it are removed by the
        next save as leftovers. CheckpointError naming the file otherwise."""
        try:
            tag = self.latest()
            if tag is not None:
                self.verify(tag, meta)
                return tag
            if fallback is None:
                return None
            refused = f"{self.directory / LATEST_NAME}: absent"
        except CheckpointError as e:
            if fallback is None:
                raise
            refused = str(e)
        if not (self.directory / fallback / META_NAME).is_file():
            raise CheckpointError(f"train.resume_from={fallback}: {self.directory / fallback} is not a complete "
                                  f"checkpoint; {self.alternatives(None)}")
        if self.dist.is_main:
            log.warning("%s\nresuming from %s instead, as train.resume_from asks", refused, fallback)
        self.verify(fallback, meta)
        if self.dist.is_main:
            atomic_write(self.directory / LATEST_NAME, fallback.encode())
        self.dist.barrier()
        return fallback

    def verify(self, tag: str, meta: dict) -> dict:
        """CheckpointError unless checkpoint ``tag`` was written by a run like this one (``meta`` as
        this run would save it) and every file is as it was written (size and sha256 against
        ``meta.json``); nothing is loaded. A collective: the ranks share the hashing. Returns the
        checkpoint's meta data."""
        path = self.directory / tag
        meta = json.loads(json.dumps(meta))  # tuples as lists, as they were saved
        try:
            saved = json.loads((path / META_NAME).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path / META_NAME}: cannot read what wrote this checkpoint ({e}); "
                                  f"it is not a complete vitscale checkpoint") from None
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
        problem = verify_files(path, saved, self.dist)
        if problem:
            raise CheckpointError(f"{problem}; {self.alternatives(tag)}")
        return saved

    def complete_tags(self, excluding: str | None = None) -> list[str]:
        """The tags of the complete checkpoints here (with a ``meta.json``), newest first."""
        return sorted((d.name for d in self.directory.iterdir() if d.name != excluding and
                       TAG_PATTERN.match(d.name) and (d / META_NAME).is_file()), reverse=True)

    def alternatives(self, refused: str | None) -> str:
        """What a user can do about a refused checkpoint, naming the other complete ones (a resume's
        options; a reader of checkpoints for another purpose overrides it)."""
        others = self.complete_tags(excluding=refused)
        older = (f"to resume from an older complete checkpoint ({', '.join(others[:5])}), set "
                 f"train.resume_from=TAG; " if others else "")
        return f"{older}to start afresh, use another run.dir or train.resume=false"

    def prune(self, keep: str) -> None:
        """Keep the newest ``keep_last`` checkpoints up to ``keep``; drop older ones and any newer
        leftovers of an interrupted save (the run resumed before them and will write them again)."""
        tags = sorted(d.name for d in self.directory.iterdir() if d.is_dir() and TAG_PATTERN.match(d.name))
        complete = [t for t in tags if t <= keep]
        survivors = set(complete[-self.keep_last:]) | {keep}
        for tag in tags:
            if tag not in survivors:
                shutil.rmtree(self.directory / tag, ignore_errors=True)
