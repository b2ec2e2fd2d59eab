"""The run directory: checked before a run starts, and held by one run at a time.

A run holds an exclusive ``flock`` on ``RUN_DIR/run.lock`` for its whole life (the launcher of a
multi-process run, or the process of a single one); the kernel releases it when the holder exits,
however it exits. A second run on the same directory is refused with the holder's pid and host,
which the file records. Other writers of a directory (the shard writer) hold it the same way, so
that any two of them are refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from pretrain.config import ConfigError
from pretrain.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
HELD_ENV = "VITSCALE_RUN_DIR_HELD"  # set by a launcher holding the lock for its ranks


class RunDirBusy(UserError, RuntimeError):
    """Another run holds the run directory; the message names its pid and host."""


def check_run_dir(run_dir: str | Path) -> None:
    """ConfigError unless ``run_dir`` is, or can be created as, a writable directory (nothing is created)."""
    path = Path(run_dir).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        what = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise ConfigError(f"run.dir={str(run_dir)!r}: {what}, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run.dir={str(run_dir)!r}: {existing} is not writable")


@contextlib.contextmanager
def hold(run_dir: str | Path, holder: str = "run", advice: str = "choose another run.dir") -> Iterator[None]:
    """Hold ``run_dir`` for the life of the block, creating it; RunDirBusy when another run holds it.

    ``holder`` says what holds it (recorded, and named to whoever is refused); ``advice`` ends the
    message of a refused ``holder``. A no-op in a process whose launcher already holds it
    (``VITSCALE_RUN_DIR_HELD``)."""
    path = Path(run_dir).expanduser()
    if os.environ.get(HELD_ENV) == str(path.absolute()):
        yield
        return
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusy(f"{path} is in use by {_holder(fd)}; wait for it to end, stop it, or {advice}") from None
        except OSError as e:  # a file system without locks: run, but say that nothing guards the directory
            log.warning("%s: cannot lock it (%s); nothing stops a second run from using it meanwhile",
                        path / LOCK_NAME, e.strerror)
            yield
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "holder": holder,
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        previous = os.environ.get(HELD_ENV)
        os.environ[HELD_ENV] = str(path.absolute())  # inherited by the ranks this process starts
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(HELD_ENV, None)
            else:
                os.environ[HELD_ENV] = previous
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a new holder)


def _holder(fd: int) -> str:
    """``another run (pid N on HOST, since ...)``, as the holder recorded itself."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return (f"another {holder.get('holder', 'run')} (pid {holder['pid']} on {holder['host']}, "
                f"since {holder['since']})")
    except (ValueError, KeyError, OSError):
        return "another run or writer (its pid and host are not recorded yet)"
