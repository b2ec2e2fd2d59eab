"""Test-only hooks: fault injection (a rank kills itself with SIGKILL at a named point of a run, or sends
itself a signal, ``VITSCALE_TEST_SIGNAL`` below, at the start of a step), and a record of the sample
keys each rank trained on.

``VITSCALE_TEST_KILL`` holds ``POINT:RANK:STEP`` entries separated by commas, e.g.
``step:1:5`` (rank 1 dies as it starts step 5) or ``save-before-latest:0:4`` (rank 0 dies while
saving the checkpoint of step 4, after every rank wrote its files, before ``latest`` moves).
The points are listed in :data:`POINTS`. Unset, a hook costs one environment lookup.
"""

from __future__ import annotations

import json
import os
import signal
import sys

ENV = "VITSCALE_TEST_KILL"
SIGNAL_ENV = "VITSCALE_TEST_SIGNAL"
KEYS_ENV = "VITSCALE_TEST_KEYS"  # a directory: each rank appends its batches' sample keys to keys-RANK.jsonl
POINTS = ("step",  # the start of a training step
          "save-before-write",  # in a save, before this rank writes any file
          "save-after-write",  # in a save, after this rank wrote its files, before the others are known done
          "save-before-latest")  # in a save, every rank's files written, ``latest`` not yet replaced


def planned() -> set[tuple[str, int, int]]:
    entries = set()
    for entry in filter(None, os.environ.get(ENV, "").split(",")):
        point, rank, step = entry.split(":")
        if point not in POINTS:
            raise ValueError(f"{ENV}: unknown point {point!r}; known: {', '.join(POINTS)}")
        entries.add((point, int(rank), int(step)))
    return entries


def maybe_die(point: str, rank: int, step: int) -> None:
    """SIGKILL this process if the environment asked for it at (point, rank, step): no clean-up,
    no flushing, exactly what a lost node or an OOM killer leaves behind."""
    if ENV in os.environ and (point, rank, step) in planned():
        print(f"[{ENV}] rank {rank} (pid {os.getpid()}) kills itself at {point}, step {step}",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_signal(rank: int, step: int) -> None:
    """``VITSCALE_TEST_SIGNAL=NAME:RANK:STEP[,...]`` (e.g. ``USR1:1:4``): rank RANK sends itself SIGNAME
    as it starts step STEP, a real signal through the run's own handler, at a step a test can name."""
    for entry in filter(None, os.environ.get(SIGNAL_ENV, "").split(",")):
        name, at_rank, at_step = entry.split(":")
        if (int(at_rank), int(at_step)) == (rank, step):
            print(f"[{SIGNAL_ENV}] rank {rank} sends itself SIG{name} at step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.Signals[f"SIG{name}"])


def record_keys(rank: int, keys) -> None:
    """Append one consumed batch's sample keys to ``$VITSCALE_TEST_KEYS/keys-RANK.jsonl`` (when set)."""
    directory = os.environ.get(KEYS_ENV)
    if directory:
        with open(os.path.join(directory, f"keys-{rank}.jsonl"), "a") as f:
            f.write(json.dumps(list(keys)) + "\n")
