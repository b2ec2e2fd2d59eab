"""The launcher's record of a run's Slurm jobs: ``RUN_DIR/slurm/events.jsonl``, one JSON object a line.

Written by the submitter (``submitted``) and by rank 0 inside the job (``started``, ``requeued``,
``finished``, ``failed``); read by ``python -m launch status``. Appends of one short line are atomic
enough on a local or network file system for this purpose.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

EVENTS_NAME = "events.jsonl"


def events_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "slurm" / EVENTS_NAME


def record(run_dir: str | Path, event: str, **fields) -> None:
    path = events_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "event": event, **fields})
    with path.open("a") as f:
        f.write(line + "\n")


def read(run_dir: str | Path) -> list[dict]:
    """Every event, oldest first; [] when the run was never submitted to Slurm."""
    path = events_path(run_dir)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash mid-write
            continue
    return out
