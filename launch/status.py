"""python -m launch status RUN_DIR: the run's Slurm jobs and where training stands.

Job ids and requeues come from the launcher's record (launch.events: ``RUN_DIR/launch/events.jsonl``,
or ``RUN_DIR/slurm/events.jsonl`` in older run dirs), live states from ``scontrol``, the last step
from ``metrics.jsonl``, how the last invocation ended from ``run.json``, the last checkpoint from
``checkpoints/latest``, and the last error lines from the newest job's logs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from launch import events
from pretrain.errors import UserError, reported
from pretrain.state.layout import CHECKPOINTS_DIR, LATEST_NAME

ERROR_LINES = 8
ERROR_PATTERN = re.compile(r"error|exception|traceback|killed|cancelled|aborted", re.I)


def slurm_state(job_id: str) -> str | None:
    """The job's state as Slurm still knows it (``RUNNING``, ``PENDING (Dependency)``...), or None."""
    if shutil.which("scontrol") is None:
        return None
    result = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    if result.returncode or not result.stdout.strip():
        return None
    # An array's line per task: pick this task's line.
    for line in result.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        task_id = f"{fields.get('ArrayJobId')}_{fields.get('ArrayTaskId')}"
        if fields.get("JobId") == job_id or task_id == job_id or "_" not in job_id:
            state = fields.get("JobState", "?")
            reason = fields.get("Reason", "None")
            return state if reason in ("None", "") else f"{state} ({reason})"
    return None


def last_step(run_dir: Path) -> int | None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    step = None
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("step", step)
        except json.JSONDecodeError:
            continue
    return step


def run_state(run_dir: Path) -> str | None:
    """How the last invocation ended, from ``run.json``: ``finished``, ``stopped`` (saved and stopped on a
    signal before the end; resubmit to resume), ``stop_at`` or ``running`` (or it died)."""
    try:
        summary = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    if "state" not in summary:
        return None
    return f"{summary['state']} at step {summary.get('step', '?')} of {summary.get('total_steps', '?')}"


def last_checkpoint(run_dir: Path) -> str | None:
    path = run_dir / CHECKPOINTS_DIR / LATEST_NAME
    return path.read_text().strip() if path.exists() else None


def error_lines(stderr_path: str | None, count: int = ERROR_LINES) -> list[str]:
    """The last lines that look like an error in a job's rank-0 stderr (the other ranks' logs too)."""
    if not stderr_path:
        return []
    rank0 = Path(stderr_path)
    files = sorted(rank0.parent.glob(rank0.name.replace("_0_log.err", "_*_log.err"))) or [rank0]
    lines: list[str] = []
    for path in files:
        if path.exists():
            text = path.read_text(errors="replace").splitlines()
            lines += [f"{path.name}: {line}" for line in text if ERROR_PATTERN.search(line)]
    return lines[-count:]


def last_event_of(record: list[dict], job_id: str) -> str | None:
    return next((e["event"] for e in reversed(record) if e.get("job_id") == job_id), None)


def summarize(run_dir: str | Path) -> list[str] | None:
    run_dir = Path(run_dir).expanduser().resolve()
    record = events.read(run_dir)
    if not record:
        return None
    out = [f"run dir: {run_dir}"]
    submitted = [e for e in record if e["event"] == "submitted"]
    for event in submitted:
        job_id = event["job_id"]
        state = slurm_state(job_id)
        # A sweep's overview points to each task's own run dir, where the task records its events.
        own = events.read(event["point"]) if "point" in event else record
        later = [e for e in own if e.get("job_id") == job_id and e["event"] != "submitted"]
        last_event = later[-1]["event"] if later else "submitted"
        requeues = sum(e["event"] == "requeued" for e in later)
        where = f"run dir {event['point']}" if "point" in event else event.get("command", "")
        out.append(f"job {job_id}: {state or 'gone from Slurm'} (last event: {last_event}, "
                   f"requeues: {requeues}) {where}")
    step, checkpoint = last_step(run_dir), last_checkpoint(run_dir)
    out.append(f"last step: {step if step is not None else 'none logged'}")
    state = run_state(run_dir)
    if state:
        out.append(f"run: {state}")
    out.append(f"last checkpoint: {run_dir / CHECKPOINTS_DIR / checkpoint if checkpoint else 'none'}")
    finished = max((i for i, e in enumerate(record) if e["event"] == "finished"), default=-1)
    failures = [e for e in record[finished + 1:] if e["event"] == "failed"]  # not those a later run fixed
    if failures:
        out.append(f"last failure: job {failures[-1]['job_id']}: {failures[-1].get('error')}")
    newest = next((e for e in reversed(record) if e.get("stderr")), None)
    ended_well = newest is not None and last_event_of(record, newest["job_id"]) == "finished"
    lines = [] if newest is None or ended_well else error_lines(newest.get("stderr"))
    if lines:
        out.append(f"last error lines (job {newest['job_id']}):")
        out += [f"  {line}" for line in lines]
    return out


def show(run_dir: str) -> int:
    """Print the run's summary; its exit code (2 when the run dir was never submitted)."""
    return reported(_print_summary, run_dir)


def _print_summary(run_dir: str) -> int:
    lines = summarize(run_dir)
    if lines is None:
        raise UserError(f"{events.events_path(Path(run_dir).expanduser())} not found: "
                        "was this run dir submitted with `python -m launch slurm`?")
    print("\n".join(lines))
    return 0
