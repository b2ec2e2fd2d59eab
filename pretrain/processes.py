"""The launcher's side of a run's processes: start them, forward save requests to them, end them together.

Every launcher uses these: ``python -m launch local`` and the demo (:func:`spawn_local`), ``launch
torchrun``'s launcher and agent, ``launch slurm``'s tasks (:class:`SaveForwarder` alone). What a rank
itself needs (dying with its launcher, the save signal, the stop exit code) is in pretrain.dist.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable

from pretrain.dist import LAUNCHER_ENV, SAVE_NOW, STOPPED_EXIT_CODE, free_port

STOP_GRACE_S = 10.0  # after a rank failed, the others get half of it to end on their own
ASKING_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)  # what a launcher takes as a save request


def spawn_local(nproc: int, module: str, args: list[str]) -> int:
    """Run ``python -m module args`` in ``nproc`` local processes (ranks) and wait for them.

    Each rank runs in its own session, so a terminal's Ctrl-C reaches only this launcher, which
    forwards SIGUSR1, SIGTERM and SIGINT to every rank as the save-now signal (SIGUSR1); a second
    SIGTERM or SIGINT stops the ranks at once. Ranks end when this launcher dies, however it dies
    (see pretrain.dist.end_with_launcher). When a rank fails, the others get a few seconds to end on
    their own (every rank may be failing on the same thing), then are stopped. Returns the ranks'
    common exit code (STOPPED_EXIT_CODE when they saved and stopped on a signal), or 1 when one
    failed alone (named on stderr).
    """
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc),
               LOCAL_WORLD_SIZE=str(nproc))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return supervise([([sys.executable, "-m", module, *args], dict(env, RANK=str(rank), LOCAL_RANK=str(rank)))
                      for rank in range(nproc)])


def supervise(commands: list[tuple[list[str], dict]], names: list[str] | None = None) -> int:
    """Start ``commands`` (each an argv and its environment) as this launcher's processes and wait
    for them, as :func:`spawn_local` describes: save signals forwarded as SIGUSR1, each in its own
    session, ended with this launcher (``VITSCALE_LAUNCHER_PID``). ``names`` name them in a failure
    message (default: ``rank N``)."""
    ranks: list[subprocess.Popen] = []
    signals = SaveForwarder(lambda: [p.pid for p in ranks if p.poll() is None], announce="launcher")
    try:
        for command, env in commands:
            ranks.append(subprocess.Popen(command, start_new_session=True,
                                          env={**env, LAUNCHER_ENV: str(os.getpid())}))
        return _wait(ranks, signals, names or [f"rank {rank}" for rank in range(len(ranks))])
    finally:
        signals.close()
        _stop(ranks)


def _wait(ranks: list[subprocess.Popen], signals: SaveForwarder, names: list[str]) -> int:
    first, failed_at = None, 0.0  # the rank that failed first: killed by a signal rather than its peers
    while not signals.hard_stop:
        codes = [p.poll() for p in ranks]
        if first is None and any(codes):
            first = min((rank for rank, code in enumerate(codes) if code), key=lambda r: (codes[r] > 0, r))
            failed_at = time.monotonic()
        if all(code is not None for code in codes):
            if stopped_together(set(codes)):
                print(f"stopped: the ranks saved and stopped before the end of the run (exit code "
                      f"{STOPPED_EXIT_CODE}); rerun the same command to resume", file=sys.stderr)
                return STOPPED_EXIT_CODE
            if len(set(codes)) == 1 and codes[0] >= 0:
                return codes[0]  # every rank ended the same way on its own (done, or the same error)
            break
        if first is not None and time.monotonic() - failed_at > STOP_GRACE_S / 2:
            break
        time.sleep(0.1)
    _stop(ranks)
    if first is not None:
        others = "; the other ranks were stopped" if len(ranks) > 1 else ""
        print(f"error: {describe_failure(names[first], ranks[first].pid, ranks[first].returncode)}{others}",
              file=sys.stderr)
    return 1


def _stop(ranks: list[subprocess.Popen]) -> None:
    """SIGKILL to ranks still running (after a failure, or a second SIGTERM/SIGINT to the launcher).
    Not SIGTERM: a rank takes its first SIGTERM as a save request (pretrain.dist.save_on_signals) and
    would go on to the next step boundary; with no handler SIGTERM gave Python no clean-up either."""
    for p in ranks:
        if p.poll() is None:
            p.kill()
    for p in ranks:
        p.wait()


class SaveForwarder:
    """Signals to this process become the save request (SAVE_NOW) of the processes running a stage.

    ``targets()`` lists those processes' pids (this process's own pid for a stage run in-process).
    The first of ``listen`` asks them to save and stop; with ``escalate``, a second SIGTERM or SIGINT
    sets :attr:`hard_stop` instead (the caller then stops them at once). A target receives SAVE_NOW
    only once it handles it (see :func:`handles`): one still starting would otherwise die of it, so
    the request waits for it. The handler only records the signal (and calls ``on_hard_stop``, if
    given, on a hard stop); a thread delivers it.
    """

    def __init__(self, targets: Callable[[], Iterable[int]], listen: tuple[int, ...] = ASKING_SIGNALS,
                 escalate: bool = True, announce: str | None = None,
                 on_hard_stop: Callable[[], None] | None = None) -> None:
        self.targets = targets
        self.escalate = escalate
        self.on_hard_stop = on_hard_stop
        self.announce = announce  # who prints a line on each request ("launcher"), or None
        self.received: list[int] = []
        self.hard_stop = False
        self._pending = threading.Event()
        self._closed = False
        self.previous = {s: signal.signal(s, self._on_signal) for s in listen}
        self._thread = threading.Thread(target=self._deliver, name="save-forwarder", daemon=True)
        self._thread.start()

    def _on_signal(self, signum, frame) -> None:
        repeated = signum != signal.SIGUSR1 and any(s != signal.SIGUSR1 for s in self.received)
        if self.escalate and repeated:
            self.hard_stop = True
            if self.on_hard_stop:
                self.on_hard_stop()
            return
        self.received.append(signum)
        if self.announce:
            print(f"{self.announce}: {signal.Signals(signum).name}: asking the ranks to save and stop"
                  + (" (send it again to stop them at once)" if self.escalate and signum != signal.SIGUSR1 else ""),
                  file=sys.stderr, flush=True)
        self._pending.set()

    def _deliver(self) -> None:
        while not self._closed:
            self._pending.wait()
            self._pending.clear()
            waiting = set(self.targets())
            while waiting and not self._closed:
                for pid in sorted(waiting):
                    if handles(pid, SAVE_NOW):
                        waiting.discard(pid)
                        try:
                            os.kill(pid, SAVE_NOW)
                        except ProcessLookupError:
                            pass
                if waiting:
                    time.sleep(0.1)
                    waiting &= set(self.targets())  # those that ended meanwhile need nothing

    def close(self) -> None:
        """Stop forwarding and give the signals their previous handlers back."""
        self._closed = True
        self._pending.set()
        self._thread.join()
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def handles(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``signum`` (Linux's /proc; elsewhere, and
    for a process that cannot be read, assumed)."""
    if pid == os.getpid():
        return callable(signal.getsignal(signum))
    try:
        status = open(f"/proc/{pid}/status").read()
    except OSError:
        return True
    caught = re.search(r"^SigCgt:\s*([0-9a-fA-F]+)", status, re.MULTILINE)
    return caught is None or bool(int(caught.group(1), 16) >> (signum - 1) & 1)


def stopped_together(exit_codes: set[int]) -> bool:
    """Whether ranks ending with ``exit_codes`` saved and stopped on a signal. A rank exits with
    STOPPED_EXIT_CODE only after every rank agreed to stop, saved and left the process group, so
    the others were done too: torch's launcher may still have ended them with SIGTERM (or SIGKILL)
    on seeing the first one exit."""
    return STOPPED_EXIT_CODE in exit_codes and exit_codes <= {STOPPED_EXIT_CODE, -signal.SIGTERM, -signal.SIGKILL}


def describe_failure(rank: int | str, pid: int, exitcode: int) -> str:
    """One line naming a lost rank (a number, or a name) and how it ended (a negative exit code is the
    signal that killed it)."""
    if exitcode < 0:
        try:
            how = f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"killed by signal {-exitcode}"
    else:
        how = f"exited with code {exitcode}"
    who = f"rank {rank}" if isinstance(rank, int) else rank
    return f"{who} (pid {pid}) died: {how}"
