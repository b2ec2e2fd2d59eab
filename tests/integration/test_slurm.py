"""``python -m launch slurm`` against the real one-node Slurm that ``.ci/slurm-up`` starts on this machine.

These tests fail (they do not skip) when Slurm is not up. Each job is tiny: a 2-layer ViT on the digits
shards for a few dozen steps, 2 tasks of 1 CPU (the node has 2).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pretrain.state.layout import tag_for
from launch.__main__ import main
from tests.conftest import QUIET, REPO, TINY_VIT
from tests.faults import fault_env

RECIPE = str(REPO / "configs" / "pretrain" / "digits_supervised.yaml")
TWO_TASKS = ["--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "10", "--job-name", "vitscale-test"]
ONE_TASK = ["--tasks-per-node", "1", "--cpus-per-task", "1", "--time", "10", "--job-name", "vitscale-test"]
JOB_TIMEOUT_S = 240


@pytest.fixture(scope="module", autouse=True)
def slurm_up():
    """Fail, not skip, without a working Slurm; afterwards cancel whatever these tests left queued."""
    if shutil.which("sinfo") is None:
        pytest.fail("Slurm is not installed: run .ci/slurm-up (as root) first")
    state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    if state.returncode or not {"idle", "mix", "alloc"} & set(state.stdout.split()):
        pytest.fail(f"Slurm is not up (sinfo: {state.stdout.strip() or state.stderr.strip()}): run .ci/slurm-up")
    yield
    subprocess.run(["scancel", "--name", "vitscale-test"], timeout=30)


def stage(digits_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["pretrain", RECIPE, f"run.dir={run_dir}", f"data.train={digits_dir}", f"data.val={digits_dir}",
            *TINY_VIT, *QUIET, "engine.precision=fp32", "data.batch_size=16", "data.shuffle_buffer=50",
            "train.epochs=null", "train.log_every=1", "train.eval_every=0", "optim.warmup_steps=2", *extra]


def launch(*args: str) -> str:
    """``python -m launch ARGS``'s output, run in this process (the submission's checks import torch,
    timm and DeepSpeed: seconds saved per call)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    assert code == 0, f"python -m launch {' '.join(args)} exited {code}\n{out.getvalue()}\n{err.getvalue()}"
    return out.getvalue()


def submit(*args: str) -> list[str]:
    out = launch("slurm", *args)
    job_ids = re.findall(r"^submitted job (\S+):", out, re.M)
    assert job_ids, out
    return job_ids


def slurm_job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_until(condition, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_ended(job_id: str, timeout: float = JOB_TIMEOUT_S) -> str:
    """The job's final state once it has left the queue (COMPLETED, FAILED, ...)."""
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    return wait_until(lambda: slurm_job(job_id).get("JobState") in ended and slurm_job(job_id)["JobState"],
                      timeout, f"job {job_id} to end", poll=1.0)


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def logged_step(run_dir: Path) -> int:
    try:
        return max(losses(run_dir), default=0)
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or a line half written
        return 0


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "launch" / "events.jsonl").read_text().splitlines()]


def logs(run_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((run_dir / "slurm").glob("*_log.*")))


STEPS = 60


@pytest.fixture(scope="module")
def reference_run(digits_dir, tmp_path_factory) -> Path:
    """An uninterrupted 2-task run, chained with a linear probe of it that starts only after it succeeded."""
    base = tmp_path_factory.mktemp("slurm")
    run_dir, second = base / "reference", base / "second"
    linear_probe = ["finetune", "linear", str(REPO / "configs/finetune/linear_demo.yaml"), f"pretrained={run_dir}",
                    f"run.dir={second}", f"data.train={digits_dir}", f"data.val={digits_dir}", "data.workers=0",
                    "linear.epochs=2", "linear.lrs=[0.1]"]
    first_id, second_id = submit(*TWO_TASKS, "--", *stage(digits_dir, run_dir, f"train.steps={STEPS}"),
                                 "--", *linear_probe)
    assert wait_ended(first_id) == "COMPLETED", logs(run_dir)
    assert wait_ended(second_id) == "COMPLETED", logs(second)
    return run_dir


def test_two_task_pretraining_runs_to_the_end(reference_run):
    summary = json.loads((reference_run / "run.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == STEPS
    assert sorted(losses(reference_run)) == list(range(1, STEPS + 1))
    assert (reference_run / "export" / "backbone.safetensors").exists()
    kinds = [e["event"] for e in events(reference_run)]
    assert kinds == ["submitted", "started", "finished"]
    status = launch("status", str(reference_run))
    assert "COMPLETED" in status and f"last step: {STEPS}" in status, status


def test_chain_runs_the_linear_probe_after_pretraining_succeeded(reference_run):
    second = reference_run.parent / "second"
    first_done = next(e for e in events(reference_run) if e["event"] == "finished")
    second_events = events(second)
    assert second_events[0]["dependency"] == f"afterok:{events(reference_run)[0]['job_id']}"
    started = next(e for e in second_events if e["event"] == "started")
    assert started["time"] >= first_done["time"]
    report = json.loads((second / "linear.json").read_text())
    assert report["heads"] and report["best_top1"] > 0


def test_preempted_twice_requeues_resumes_and_continues_the_trajectory(reference_run, digits_dir, tmp_path):
    run_dir = tmp_path / "preempted"
    (job_id,) = submit(*TWO_TASKS, "--max-requeues", "2", "--", *stage(digits_dir, run_dir, f"train.steps={STEPS}"))
    stops = []
    for requeue in range(2):
        after = stops[-1] if stops else 0
        wait_until(lambda: logged_step(run_dir) >= after + 3, JOB_TIMEOUT_S, f"training past step {after + 3}")
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        wait_until(lambda: sum(e["event"] == "requeued" for e in events(run_dir)) > requeue, 60,
                   f"requeue {requeue + 1}")
        stops.append(int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_")))
        assert stops[-1] < STEPS, "the run ended before the signal: the test needs more steps"
    assert wait_ended(job_id) == "COMPLETED", logs(run_dir)

    text = logs(run_dir)
    for step in stops:
        assert f"stopped on request at step {step}" in text, text
        assert f"resumed from {run_dir / 'checkpoints' / tag_for(step)} at step {step}" in text, text
    kinds = [e["event"] for e in events(run_dir)]
    assert kinds == ["submitted", "started", "requeued", "started", "requeued", "started", "finished"]
    assert slurm_job(job_id)["Restarts"] == "2"
    # Resuming truncated the log to the checkpoint's step, so each step appears once, and the losses
    # after each resume are those of the run that was never interrupted.
    resumed, reference = losses(run_dir), losses(reference_run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert resumed == pytest.approx(reference, rel=1e-5, abs=1e-6)
    status = launch("status", str(run_dir))
    assert "requeues: 2" in status, status


def test_sweep_runs_one_array_task_per_point(digits_dir, tmp_path):
    base = tmp_path / "sweep"
    job_ids = submit(*ONE_TASK, "--", *stage(digits_dir, base, "train.steps=3", "optim.lr=0.001,0.002"))
    assert len(job_ids) == 2 and len({j.split("_")[0] for j in job_ids}) == 1  # one array
    for job_id in job_ids:
        assert wait_ended(job_id) == "COMPLETED", logs(base)
    for lr in ("0.001", "0.002"):
        summary = json.loads((base / f"optim.lr={lr}" / "run.json").read_text())
        assert summary["peak_lr"] == pytest.approx(float(lr)) and summary["step"] == 3


def task_pids(job_id: str) -> dict[int, int]:
    """Slurm rank -> pid of the job's Python tasks on this node (not their forked data workers)."""
    out = subprocess.run(["scontrol", "listpids", job_id], capture_output=True, text=True).stdout
    tasks = {}
    for pid in (int(line.split()[0]) for line in out.splitlines()[1:] if line.split()[0].isdigit()):
        try:
            env = dict(item.split("=", 1) for item in
                       Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0") if "=" in item)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            parent = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        except OSError:
            continue
        if b"submitit.core._submit" in cmdline and "SLURM_PROCID" in env:
            tasks[pid] = (int(env["SLURM_PROCID"]), parent)
    return {rank: pid for pid, (rank, parent) in tasks.items() if parent not in tasks}


def test_killed_rank_ends_the_job_and_a_rerun_resumes(digits_dir, tmp_path):
    run_dir = tmp_path / "killed"
    args = [*TWO_TASKS, "--", *stage(digits_dir, run_dir, "train.steps=40", "train.ckpt_every=5")]
    (job_id,) = submit(*args)
    wait_until(lambda: (run_dir / "checkpoints" / "latest").exists() and logged_step(run_dir) >= 7,
               JOB_TIMEOUT_S, "a checkpoint")
    pids = wait_until(lambda: task_pids(job_id).get(1) and task_pids(job_id), 10, "rank 1's pid")
    os.kill(pids[1], signal.SIGKILL)
    killed_at = time.monotonic()
    assert wait_ended(job_id, timeout=60) == "FAILED"
    assert time.monotonic() - killed_at < 60
    assert re.search(r"srun: error: \S+: task 1: Killed", logs(run_dir)), logs(run_dir)[-5000:]  # the lost rank
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    step = int(latest.removeprefix("step_"))
    assert step < 40

    (rerun_id,) = submit(*args)
    assert wait_ended(rerun_id) == "COMPLETED", logs(run_dir)
    assert f"resumed from {run_dir / 'checkpoints' / latest} at step {step}" in logs(run_dir)
    assert json.loads((run_dir / "run.json").read_text())["step"] == 40
    status = launch("status", str(run_dir))
    assert f"job {job_id}: FAILED" in status and f"job {rerun_id}: COMPLETED" in status, status


def test_a_stopped_stage_fails_its_job_and_the_chain_stops_there(digits_dir, tmp_path):
    """Rank 0 receives SIGUSR1 as step 3 starts (VITSCALE_TEST_SIGNAL, exported to the job): the stage
    saves and stops at step 4 of 20, its job ends unsuccessfully (exit code 75), and the chained linear
    probe never starts."""
    run_dir, probe_dir = tmp_path / "stopped", tmp_path / "never"
    linear_probe = ["finetune", "linear", str(REPO / "configs/finetune/linear_demo.yaml"), f"pretrained={run_dir}",
                    f"run.dir={probe_dir}", f"data.train={digits_dir}", f"data.val={digits_dir}", "data.workers=0",
                    "linear.epochs=1", "linear.lrs=[0.1]"]
    saved = dict(os.environ)
    os.environ.update(fault_env(VITSCALE_TEST_SIGNAL="USR1:0:3"))  # sbatch hands the environment to the job
    try:
        first_id, second_id = submit(*TWO_TASKS, "--", *stage(digits_dir, run_dir, "train.steps=20"), "--",
                                     *linear_probe)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert wait_ended(first_id) == "FAILED", logs(run_dir)
    assert [e["event"] for e in events(run_dir)] == ["submitted", "started", "stopped"]
    summary = json.loads((run_dir / "run.json").read_text())
    assert (summary["state"], summary["step"]) == ("stopped", 4)
    assert (run_dir / "checkpoints" / "latest").read_text() == tag_for(4)
    wait_until(lambda: slurm_job(second_id).get("Reason") == "DependencyNeverSatisfied"
               or slurm_job(second_id).get("JobState") == "CANCELLED", 60, "the chained job to be held back")
    assert [e["event"] for e in events(probe_dir)] == ["submitted"]
    status = launch("status", str(run_dir))
    assert "run: stopped at step 4 of 20" in status and "last event: stopped" in status, status


def test_scancel_saves_with_data_workers_that_ignore_sigterm(digits_dir, tmp_path):
    """A plain scancel (SIGTERM to every process of the job, data workers included) makes the ranks
    save and stop, as it does without workers; a SIGTERM to the workers alone changes nothing."""
    import psutil

    run_dir = tmp_path / "cancelled"
    (job_id,) = submit(*TWO_TASKS, "--", *stage(digits_dir, run_dir, "train.steps=3000", "data.workers=1"))
    wait_until(lambda: logged_step(run_dir) >= 3, JOB_TIMEOUT_S, "training past step 3")
    ranks = wait_until(lambda: len(task_pids(job_id)) == 2 and task_pids(job_id), 10, "both ranks' pids")
    workers = [child for pid in ranks.values() for child in psutil.Process(pid).children()]
    assert len(workers) == 2, workers  # one data worker per rank
    for worker in workers:
        os.kill(worker.pid, signal.SIGTERM)
    after = logged_step(run_dir)
    wait_until(lambda: logged_step(run_dir) >= after + 5, 60, "training to go on after SIGTERM to the workers")
    assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)

    cancelled_at = logged_step(run_dir)
    subprocess.run(["scancel", job_id], check=True)
    assert wait_ended(job_id, timeout=60) == "CANCELLED"
    step = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert cancelled_at <= step < 3000
    text = logs(run_dir)
    assert f"stopped on request at step {step}" in text, text[-5000:]
    assert "DataLoader" not in text, text[-5000:]
    assert [e["event"] for e in events(run_dir)][-1] == "stopped"
