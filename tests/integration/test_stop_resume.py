"""A run stopped by a signal (SIGUSR1 on one rank, ``VITSCALE_TEST_SIGNAL``) off a ``log_every``
boundary, then resumed, through ``python -m launch local --nproc 2``: the stop has its own exit code
and is recorded in ``run.json``, and every loss logged after the resume is the uninterrupted run's
(the partial logging window travels in the checkpoint)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.state.layout import tag_for
from pretrain.dist import STOPPED_EXIT_CODE
from tests.conftest import QUIET, REPO, TINY_VIT, python_env
from tests.faults import fault_env

RECIPE = str(REPO / "configs/pretrain/digits_supervised.yaml")
STEPS = 8
JOB = [*QUIET, *TINY_VIT, "engine.precision=fp32", "engine.zero_stage=1", "train.epochs=null", f"train.steps={STEPS}",
       "train.ckpt_every=5", "train.log_every=3", "train.eval_every=0", "data.batch_size=16", "optim.warmup_steps=2",
       "data.val=null", "data.prepare=none"]


def launch(run_dir: Path, digits: Path, signal_at: str = "") -> subprocess.CompletedProcess:
    env = fault_env(python_env(), VITSCALE_TEST_SIGNAL=signal_at)
    command = [sys.executable, "-m", "launch", "local", "--nproc", "2", RECIPE, f"run.dir={run_dir}",
               f"data.train={digits}", *JOB]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def logged(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    return {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def test_a_stopped_run_says_so_and_its_resumed_losses_are_the_uninterrupted_ones(tmp_path, digits_dir):
    whole = launch(tmp_path / "whole", digits_dir)
    assert whole.returncode == 0, whole.stderr[-5000:]
    assert summary(tmp_path / "whole")["state"] == "finished"

    run_dir = tmp_path / "stopped"
    # Rank 1 alone receives SIGUSR1 as step 4 starts; the ranks agree on it on the device and read
    # the verdict at the next step that logs or saves: the save after step 5, inside the logging
    # window of steps 4-6.
    stopped = launch(run_dir, digits_dir, signal_at="USR1:1:4")
    assert stopped.returncode == STOPPED_EXIT_CODE, stopped.stderr[-5000:]
    assert "stopped on request at step 5; checkpoint saved" in stopped.stdout + stopped.stderr
    assert f"exit code {STOPPED_EXIT_CODE}" in stopped.stderr and "Traceback" not in stopped.stderr
    state = summary(run_dir)
    assert (state["state"], state["step"], state["total_steps"]) == ("stopped", 5, STEPS)
    assert (run_dir / "checkpoints" / "latest").read_text() == tag_for(5)
    assert sorted(logged(run_dir)) == [3]  # whole windows only
    assert not (run_dir / "export").exists()

    resumed = launch(run_dir, digits_dir)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    state = summary(run_dir)
    assert (state["state"], state["step"], state["resumed_from"]) == ("finished", STEPS, tag_for(5))
    a, b = logged(tmp_path / "whole"), logged(run_dir)
    assert sorted(a) == sorted(b) == [3, 6, 8]
    assert b == pytest.approx(a, rel=1e-6, abs=1e-6)
