"""The life of a rank's data workers: they leave the save signals to their rank, end when it ends,
and never keep it from exiting."""

from __future__ import annotations

import atexit
import os
import signal
import threading
import time
import weakref
from typing import Iterator

SAVE_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def shield_worker(worker_id: int = 0, rank_pid: int | None = None) -> None:
    """A data worker's ``worker_init_fn``: the save signals are its rank's to act on, not its own.

    ``scancel``, a preemption or a terminal's Ctrl-C signal every process of a job or a process
    group, workers included; a worker that died of it would crash its rank in the DataLoader before
    the rank could save. So workers ignore them (so do the ``pipe:`` commands they start: an ignored
    signal stays ignored across exec), and end when their rank is gone, however it died. The
    DataLoader's own shutdown does not need signals (its terminate() is a last resort for a hung
    worker, which now ends with its rank instead). A mask would not do: torch starts a thread in
    each worker before this runs, and a process-wide signal goes to any thread that does not block it.

    ``rank_pid`` is the process that started the loader, passed from there: a worker may start after
    its rank died, and its parent by then is whoever adopted it.
    """
    for signum in SAVE_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    threading.Thread(target=_end_with_rank, args=(rank_pid or os.getppid(), os.getppid()), name="rank-watch",
                     daemon=True).start()


def _end_with_rank(rank_pid: int, parent: int) -> None:
    """Exit once the rank is gone, or the parent at start (the rank, or a fork server that ends with
    it under the "forkserver" start method) is."""
    while os.getppid() == parent and _exists(rank_pid):
        time.sleep(0.5)
    os._exit(1)  # nothing will read this worker's batches


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process by now: the pid was reused
        return False
    return True


# The data workers this process started, and the DataLoader iterators still open over them, for the
# exit hook below.
_open_iterators: "weakref.WeakSet" = weakref.WeakSet()
_started_workers: "weakref.WeakSet" = weakref.WeakSet()
_exit_hook_registered = False


def end_workers_at_exit(batches: Iterator) -> None:
    """Make sure the workers behind a DataLoader iterator cannot keep this process from exiting.

    The workers ignore SIGTERM (:func:`shield_worker`), and multiprocessing's own exit hook
    terminates its daemonic children with SIGTERM and then joins them: a process that exits with a
    worker still alive would wait for it forever, and the worker for its parent. That happens with a
    loader still open at exit (a generator kept alive by a reference cycle, an exception), and with
    a closed one whose worker was busy (the DataLoader's shutdown waits 5 s for a worker, then only
    sends SIGTERM). This hook, registered after multiprocessing's and so run before it, shuts open
    loaders down as the DataLoader does and kills every worker still alive: nothing will read its
    batches, and it holds nothing that needs a clean end.
    """
    global _exit_hook_registered
    workers = getattr(batches, "_workers", None)
    if workers:
        _open_iterators.add(batches)
        _started_workers.update(workers)  # multiprocessing holds each until it is joined
    if not _exit_hook_registered:
        atexit.register(end_all_workers)
        _exit_hook_registered = True


def end_workers_now(batches: Iterator) -> None:
    """End the workers behind one DataLoader iterator (a stream that failed): shut it down as the
    DataLoader does, then kill any worker still alive."""
    workers = list(getattr(batches, "_workers", ()))
    if hasattr(batches, "_shutdown_workers"):
        batches._shutdown_workers()  # tells torch not to report the workers' end as a failure
    _open_iterators.discard(batches)
    _kill_alive(workers)


def end_all_workers() -> None:
    """Shut every open loader down and kill every worker still alive (at exit)."""
    for batches in list(_open_iterators):
        batches._shutdown_workers()
    _kill_alive(list(_started_workers))


def _kill_alive(workers: list) -> None:
    for worker in workers:
        if worker.exitcode is None:
            os.kill(worker.pid, signal.SIGKILL)
            worker.join()
