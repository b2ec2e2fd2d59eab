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
