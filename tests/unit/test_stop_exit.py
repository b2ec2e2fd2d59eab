"""How ``python -m launch local`` tells a stop from a failure: a rank exits with STOPPED_EXIT_CODE only
after every rank saved and left the process group, and torch's launcher may end the others with
SIGTERM (or SIGKILL) on seeing it exit first."""

from __future__ import annotations

import signal

import pytest

from pretrain.dist import STOPPED_EXIT_CODE
from pretrain.processes import stopped_together


@pytest.mark.parametrize("codes, stopped", [
    ({STOPPED_EXIT_CODE}, True),
    ({STOPPED_EXIT_CODE, -signal.SIGTERM}, True),
    ({STOPPED_EXIT_CODE, -signal.SIGKILL}, True),
    ({STOPPED_EXIT_CODE, 1}, False),  # another rank failed: a failure
    ({-signal.SIGTERM}, False),
    ({1}, False),
])
def test_a_stop_is_told_from_a_failure_by_the_ranks_exit_codes(codes, stopped):
    assert stopped_together(codes) is stopped


# A rank that takes a while to start: it handles SIGUSR1 only after a second (SIGUSR1's default
# action, before that, would kill it), then reports the save request and exits 0.
SLOW_RANK = """
import signal, sys, time
time.sleep(1.0)
signal.signal(signal.SIGUSR1, lambda *_: sys.exit(print("save requested", flush=True)))
print("ready", flush=True)
time.sleep(30)
sys.exit(3)
"""


def test_a_save_request_waits_until_the_rank_handles_it_and_a_second_sigterm_stops_at_once():
    import os
    import subprocess
    import sys

    from pretrain.processes import SaveForwarder

    rank = subprocess.Popen([sys.executable, "-c", SLOW_RANK], stdout=subprocess.PIPE, text=True)
    previous = signal.getsignal(signal.SIGTERM)
    forwarder = SaveForwarder(lambda: [rank.pid] if rank.poll() is None else [])
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # as the rank starts: the request waits for its handler
        out, _ = rank.communicate(timeout=20)
        assert rank.returncode == 0 and out.split() == ["ready", "save", "requested"], (rank.returncode, out)
        assert not forwarder.hard_stop and forwarder.received == [signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGTERM)  # a second one: stop at once
        assert forwarder.hard_stop
    finally:
        forwarder.close()
        rank.kill()
        rank.wait()
    assert signal.getsignal(signal.SIGTERM) is previous


# A rank's side (pretrain.dist.save_on_signals): SIGUSR1 and a first SIGTERM ask for a save, a second
# SIGTERM ends it at once; a SIGTERM handler already installed (a Slurm task's forwarder) is kept.
RANK_SIGNALS = """
import os, signal, sys, time
from pretrain.dist import save_on_signals
if sys.argv[1] == "handled":
    signal.signal(signal.SIGTERM, lambda *_: print("own handler", flush=True))
save_on_signals(lambda: print("save requested", flush=True))
for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGTERM):
    os.kill(os.getpid(), signum)
    time.sleep(0.2)
print("alive", flush=True)
"""


@pytest.mark.parametrize("sigterm", ["default", "handled"])
def test_a_rank_saves_on_sigusr1_and_a_first_sigterm_and_dies_on_the_second(sigterm):
    import subprocess
    import sys

    from tests.conftest import REPO, python_env

    done = subprocess.run([sys.executable, "-c", RANK_SIGNALS, sigterm], cwd=REPO, env=python_env(),
                          capture_output=True, text=True, timeout=60)
    if sigterm == "default":
        assert done.returncode == -signal.SIGTERM and done.stdout.split("\n")[:-1] == ["save requested"] * 2, done
    else:
        assert done.returncode == 0, done
        assert done.stdout.split("\n")[:-1] == ["save requested", "own handler", "own handler", "alive"], done
