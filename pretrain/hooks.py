"""Named points of a run that code outside the training loop can observe.

The loop and the checkpointer announce where they are (:data:`POINTS`); an observer is a callable
``observer(point, **fields)``. Observers are added in-process with :func:`observe`, or, for a run
started as a command (a launcher and its ranks), by naming importable modules in
``VITSCALE_OBSERVERS`` (comma-separated): each rank imports them at the first point it reaches, and
they call :func:`observe` when imported. The tests inject their faults this way (tests/faults.py),
so that no fault injection sits in the loop; a profiler or a custom logger can hook in the same way.
With no observer a point costs a function call.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

ENV = "VITSCALE_OBSERVERS"
POINTS = {
    "step": "a training step starts (fields: rank, step)",
    "loss": "a micro-batch's loss is computed, before backward (rank, step, micro, loss: the tensor)",
    "batch": "the loader hands over a batch (rank, keys: the batch's sample keys, when the view keeps them)",
    "save-before-write": "in a save, before this rank writes any file (rank, step)",
    "save-after-write": "in a save, after this rank wrote its files, before the others are known done (rank, step)",
    "save-before-latest": "in a save, every rank's files written, ``latest`` not yet replaced (rank, step)",
}

_observers: list[Callable[..., None]] = []
_environment_loaded = False


def observe(observer: Callable[..., None]) -> Callable[..., None]:
    """Call ``observer(point, **fields)`` at every point from now on (usable as a decorator)."""
    _observers.append(observer)
    return observer


def forget(observer: Callable[..., None]) -> None:
    _observers.remove(observer)


def fire(point: str, **fields) -> None:
    if not _environment_loaded:
        _load_environment()
    for observer in _observers:
        observer(point, **fields)


def _load_environment() -> None:
    global _environment_loaded
    _environment_loaded = True
    for name in filter(None, os.environ.get(ENV, "").split(",")):
        try:
            importlib.import_module(name.strip())
        except ImportError as e:
            raise ImportError(f"{ENV} names {name!r}, which cannot be imported here: {e}") from e
