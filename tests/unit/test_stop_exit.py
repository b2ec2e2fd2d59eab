"""How ``python -m launch local`` tells a stop from a failure: a rank exits with STOPPED_EXIT_CODE only
after every rank saved and left the process group, and torch's launcher may end the others with
SIGTERM (or SIGKILL) on seeing it exit first."""

from __future__ import annotations

import signal

import pytest

from pretrain.dist import STOPPED_EXIT_CODE, stopped_together


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
