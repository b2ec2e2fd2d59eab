"""The launcher's record of a run's jobs: ``RUN_DIR/launch/events.jsonl``, one JSON object a line.

Written by the submitter (``submitted``) and by rank 0 inside the job (``started``, ``requeued``,
``stopped``, ``finished``, ``failed``); read by ``python -m launch status``. Appends of one short line
are atomic enough on a local or network file system for this purpose. Run dirs written before the
record moved keep theirs in ``RUN_DIR/slurm/events.jsonl``, which is still read (first: it is older).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

EVENTS_NAME = "events.jsonl"
OLD_DIR = "slurm"  # where the record was kept before it was the launcher's, not Slurm's


def events_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "launch" / EVENTS_NAME


def record(run_dir: str | Path, event: str, **fields) -> None:
    path = events_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "event": event, **fields})
    with path.open("a") as f:
        f.write(line + "\n")


def read(run_dir: str | Path) -> list[dict]:
    """Every event, oldest first; [] when the run was never submitted."""
    out = []
    for path in (Path(run_dir) / OLD_DIR / EVENTS_NAME, events_path(run_dir)):
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash mid-write
                continue
    return out
