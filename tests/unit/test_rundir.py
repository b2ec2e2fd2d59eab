"""The run-dir lock: one run at a time, the holder named, released however the holder ends."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from pretrain.config import ConfigError
from pretrain.rundir import HELD_ENV, RunDirBusy, check_run_dir, hold
from tests.conftest import REPO

HOLD_FOREVER = "import sys, time\nfrom pretrain.rundir import hold\nwith hold(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n"


def test_a_held_run_dir_is_refused_naming_the_holder_and_freed_when_it_is_killed(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != HELD_ENV}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_FOREVER, str(tmp_path / "run")], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=rf"in use by another run \(pid {holder.pid} on {socket.gethostname()}"):
            with hold(tmp_path / "run"):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with hold(tmp_path / "run"):  # the kernel released it with the process
            assert os.environ[HELD_ENV] == str((tmp_path / "run").absolute())
            with hold(tmp_path / "run"):  # what a launcher's ranks do: a no-op
                pass
        assert HELD_ENV not in os.environ
    finally:
        holder.kill()


def test_a_run_dir_on_a_file_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"run.dir=.*file': is a file, not a directory"):
        check_run_dir(tmp_path / "file")
    with pytest.raises(ConfigError, match=r"cannot be created: .*file is a file"):
        check_run_dir(tmp_path / "file" / "run")
    check_run_dir(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()
