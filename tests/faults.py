"""Fault injection for the tests, from outside the loop: an observer of the run's points
(pretrain/hooks.py) that does what the environment asks.

A test starts a run with :func:`fault_env` (``VITSCALE_OBSERVERS=tests.faults``, and the repository on
``PYTHONPATH`` so that every rank can import this module), plus any of:

- ``VITSCALE_TEST_KILL=POINT:RANK:STEP[,...]``, e.g. ``step:1:5`` (rank 1 SIGKILLs itself as it starts
  step 5) or ``save-before-latest:0:4`` (rank 0 dies while saving the checkpoint of step 4, after
  every rank wrote its files, before ``latest`` moves). :data:`KILL_POINTS` lists the points.
- ``VITSCALE_TEST_SIGNAL=NAME:RANK:STEP[,...]``, e.g. ``USR1:1:4``: rank RANK sends itself SIGNAME as it
  starts step STEP, a real signal through the run's own handler.
- ``VITSCALE_TEST_NAN_STEPS=3,4``: every rank's loss at those steps is made NaN.
- ``VITSCALE_TEST_KEYS=DIR``: each rank appends its batches' sample keys to ``DIR/keys-RANK.jsonl``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from pretrain import hooks

KILL_ENV = "VITSCALE_TEST_KILL"
SIGNAL_ENV = "VITSCALE_TEST_SIGNAL"
NAN_ENV = "VITSCALE_TEST_NAN_STEPS"
KEYS_ENV = "VITSCALE_TEST_KEYS"
KILL_POINTS = ("step", "save-before-write", "save-after-write", "save-before-latest")
REPO = Path(__file__).resolve().parents[1]


def fault_env(env: dict | None = None, **settings: str) -> dict:
    """``env`` (default: this process's) with this module observing the run and ``settings``
    (e.g. ``VITSCALE_TEST_KILL="step:1:5"``) set."""
    out = dict(os.environ if env is None else env, **settings)
    out[hooks.ENV] = ",".join(filter(None, [out.get(hooks.ENV), __name__]))
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), out.get("PYTHONPATH")]))
    return out


def _entries(name: str) -> list[list[str]]:
    return [entry.split(":") for entry in os.environ.get(name, "").split(",") if entry]


def inject(point: str, rank: int = 0, step: int | None = None, **fields) -> None:
    if point in KILL_POINTS:
        for at_point, at_rank, at_step in _entries(KILL_ENV):
            if at_point not in KILL_POINTS:
                raise ValueError(f"{KILL_ENV}: unknown point {at_point!r}; known: {', '.join(KILL_POINTS)}")
            if (at_point, int(at_rank), int(at_step)) == (point, rank, step):
                # SIGKILL: no clean-up, no flushing, what a lost node or an OOM killer leaves behind.
                print(f"[{KILL_ENV}] rank {rank} (pid {os.getpid()}) kills itself at {point}, step {step}",
                      file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
    if point == "step":
        for name, at_rank, at_step in _entries(SIGNAL_ENV):
            if (int(at_rank), int(at_step)) == (rank, step):
                print(f"[{SIGNAL_ENV}] rank {rank} sends itself SIG{name} at step {step}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.Signals[f"SIG{name}"])
    elif point == "loss" and str(step) in os.environ.get(NAN_ENV, "").split(","):
        # In place: the loop goes on with the very tensor it handed over, as if the model produced NaN.
        fields["loss"].detach().fill_(float("nan"))
    elif point == "batch" and os.environ.get(KEYS_ENV):
        with open(os.path.join(os.environ[KEYS_ENV], f"keys-{rank}.jsonl"), "a") as f:
            f.write(json.dumps(list(fields["keys"])) + "\n")


hooks.observe(inject)
