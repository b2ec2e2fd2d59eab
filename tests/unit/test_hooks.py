"""The run's observation points: observers see what the loop and the checkpointer announce, and a
module named in VITSCALE_OBSERVERS that cannot be imported is a clear error naming it."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from pretrain import hooks
from pretrain.dist import DistEnv
from pretrain.state.checkpoints import Checkpoints
from tests.conftest import REPO
from tests.faults import fault_env
from tests.unit.test_checkpoint_faults import META, FilesEngine


def test_a_save_announces_its_points_in_order(tmp_path):
    seen = []

    def observer(point, **fields):
        seen.append((point, fields))

    hooks.observe(observer)
    try:
        Checkpoints(tmp_path, keep_last=1, dist=DistEnv()).save(FilesEngine(), 7, {"step": 7}, META)
    finally:
        hooks.forget(observer)
    assert seen == [(point, {"rank": 0, "step": 7})
                    for point in ("save-before-write", "save-after-write", "save-before-latest")]


def fire_in_a_child(env: dict, rank: int, step: int) -> subprocess.CompletedProcess:
    """A fresh process (no observer registered in it) that reaches the point ``step``."""
    script = f"from pretrain import hooks\nhooks.fire('step', rank={rank}, step={step})\n"
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_observers_named_in_the_environment_are_loaded_by_the_first_point():
    env = fault_env(VITSCALE_TEST_KILL="step:1:5")
    assert fire_in_a_child(env, rank=1, step=4).returncode == 0
    killed = fire_in_a_child(env, rank=1, step=5)
    assert killed.returncode == -signal.SIGKILL and "rank 1" in killed.stderr and "at step, step 5" in killed.stderr


@pytest.mark.parametrize("names", ["tests.no_such_observer", "tests.faults,no_such_package.observer"])
def test_an_observer_that_cannot_be_imported_is_named(names):
    failed = fire_in_a_child({**fault_env(), hooks.ENV: names}, rank=0, step=0)
    assert failed.returncode == 1
    missing = names.split(",")[-1]
    assert f"VITSCALE_OBSERVERS names '{missing}', which cannot be imported here" in failed.stderr
