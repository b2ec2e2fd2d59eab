"""`python -m launch local` as the owner of its ranks: it forwards the save signals to them, they do
not outlive it, and it holds its run dir so that a second run cannot write into it meanwhile."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pretrain.dist import STOPPED_EXIT_CODE
from pretrain.rundir import hold
from tests.conftest import QUIET, REPO, TINY_VIT, python_env, run_module

RECIPE = str(REPO / "configs/pretrain/digits_supervised.yaml")
# Long enough never to end on its own in these tests; one data worker per rank.
JOB = [*QUIET, *TINY_VIT, "engine.precision=fp32", "train.epochs=null", "train.steps=5000", "train.log_every=1",
       "train.eval_every=0", "data.batch_size=16", "data.val=null", "data.prepare=none", "data.workers=1"]


def start(run_dir: Path, digits: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launch", "local", "--nproc", "2", RECIPE, f"run.dir={run_dir}",
                             f"data.train={digits}", *JOB], cwd=REPO, env=python_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def logged_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return max((json.loads(line).get("step", 0) for line in lines[:-1]), default=0)  # the last may be half
    except FileNotFoundError:
        return 0


def wait_training(launcher: subprocess.Popen, run_dir: Path, past: int = 2, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while logged_step(run_dir) < past:
        assert launcher.poll() is None, launcher.stdout.read()[-5000:]
        assert time.monotonic() < deadline, "the ranks did not start training"
        time.sleep(0.2)


def processes_under(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def test_ranks_and_their_data_workers_end_when_the_launcher_is_killed(tmp_path, digits_dir):
    run_dir = tmp_path / "orphans"
    launcher = start(run_dir, digits_dir)
    try:
        wait_training(launcher, run_dir)
        ranks, family = psutil.Process(launcher.pid).children(), processes_under(launcher.pid)
        assert len(ranks) == 2 and len(family) >= 4, family  # 2 ranks, a data worker each
        launcher.kill()
        launcher.wait()
        gone, alive = psutil.wait_procs(family, timeout=10)
        assert not alive, f"outlived their launcher: {[(p.pid, p.cmdline()[-3:]) for p in alive]}"
    finally:
        launcher.kill()
        for p in psutil.process_iter(["cmdline"]):  # nothing of this run may be left whatever failed above
            if str(run_dir) in " ".join(p.info["cmdline"] or []):
                try:
                    p.kill()
                except psutil.Error:
                    pass


def test_a_second_run_is_refused_and_sigusr1_to_the_launcher_saves(tmp_path, digits_dir):
    run_dir = tmp_path / "held"
    launcher = start(run_dir, digits_dir)
    try:
        wait_training(launcher, run_dir)
        second = run_module("launch", "local", "--nproc", "2", RECIPE, f"run.dir={run_dir}",
                            f"data.train={digits_dir}", *JOB, check=False)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"{run_dir} is in use by another run (pid {launcher.pid} on {socket.gethostname()}" in second.stderr
        assert len(psutil.Process(launcher.pid).children()) == 2, "the second run started processes"

        stopped_at = logged_step(run_dir)
        launcher.send_signal(signal.SIGUSR1)
        out, _ = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode == STOPPED_EXIT_CODE, out[-5000:]  # saved and stopped before train.steps
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    step = int(latest.removeprefix("step_"))
    assert stopped_at <= step < 5000 and f"stopped on request at step {step}" in out, out[-5000:]
    with hold(run_dir):  # the lock went with the run
        pass


def signal_all(processes: list[psutil.Process], signum: int) -> None:
    for p in processes:
        try:
            p.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


@pytest.mark.parametrize("target", ["launcher", "ranks", "every process"])
def test_sigterm_to_the_launcher_the_ranks_or_every_process_saves_and_stops(tmp_path, digits_dir, target):
    """What `scancel` of a batch job running this launcher, `systemctl stop` or a cgroup-wide kill
    send: SIGTERM to the launcher, the ranks and their data workers at once; or to the ranks alone,
    or the launcher alone. The ranks take it as a save request (the data workers ignore it), as they
    take the launcher's."""
    run_dir = tmp_path / target.replace(" ", "-")
    launcher = start(run_dir, digits_dir)
    try:
        wait_training(launcher, run_dir)
        ranks, family = psutil.Process(launcher.pid).children(), processes_under(launcher.pid)
        assert len(ranks) == 2 and len(family) >= 4, family  # 2 ranks, a data worker each
        chosen = {"launcher": [psutil.Process(launcher.pid)], "ranks": ranks,
                  "every process": [psutil.Process(launcher.pid), *family]}[target]
        stopped_at = logged_step(run_dir)
        signal_all(chosen, signal.SIGTERM)
        out, _ = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode == STOPPED_EXIT_CODE, out[-5000:]
    step = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert stopped_at <= step < 5000 and f"stopped on request at step {step}" in out, out[-5000:]
