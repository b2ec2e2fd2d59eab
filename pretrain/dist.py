"""Process topology from the environment (torchrun, srun, or a single process) and small collectives.

Nothing here is global: callers hold a :class:`DistEnv` and pass it on.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce (``sum``, ``max`` or ``min``); a no-op for a single process."""
        if self.world_size > 1:
            tdist.all_reduce(tensor, op={"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX,
                                         "min": tdist.ReduceOp.MIN}[op])
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            tdist.barrier()

    def sum_counts(self, counts: dict[str, float]) -> dict[str, float]:
        """Per-key sums of every rank's numbers (keys may differ between ranks; a collective)."""
        if self.world_size == 1:
            return dict(counts)
        gathered = [None] * self.world_size
        tdist.all_gather_object(gathered, dict(counts))
        total: dict[str, float] = {}
        for part in gathered:
            for key, value in part.items():
                total[key] = total.get(key, 0) + value
        return total

    def all_gather_into(self, out: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (same shape everywhere) into ``out``, rank-major along dim 0."""
        if self.world_size == 1:
            return out.copy_(tensor.reshape(out.shape))
        tdist.all_gather_into_tensor(out, tensor.contiguous())
        return out

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (same shape everywhere), concatenated in rank order along dim 0."""
        if self.world_size == 1:
            return tensor
        return self.all_gather_into(tensor.new_empty(self.world_size * len(tensor), *tensor.shape[1:]), tensor)

    def all_gather_list(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape everywhere), one tensor per rank, in rank order."""
        if self.world_size == 1:
            return [tensor]
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        tdist.all_gather(parts, tensor.contiguous())
        return parts

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank; a collective."""
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size
        tdist.all_gather_object(gathered, obj)
        return gathered


def all_reduce_differentiable(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks of the default process group, with the gradient flowing
    back to every rank's input (for modules that hold no DistEnv: synchronized batch norm)."""
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        import torch.distributed.nn.functional as dist_nn

        return dist_nn.all_reduce(tensor)
    return tensor


# The exit code of a stage that saved and stopped on a signal (SIGUSR1, or Slurm's via the launcher)
# before train.steps: EX_TEMPFAIL, "try again later". Rerunning the same command resumes it; a chain
# must not start its next stage.
STOPPED_EXIT_CODE = 75


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def topology_from_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun or srun set them; (0, 1, 0) otherwise."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_distributed(timeout_s: float = 1800.0) -> DistEnv:
    """Join (or, alone, create) the process group: NCCL on GPUs, gloo on CPU."""
    end_with_launcher()
    rank, world_size, local_rank = topology_from_environment()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if world_size > 1:
            raise RuntimeError("MASTER_PORT is not set: start several processes with `python -m launch`")
        os.environ["MASTER_PORT"] = str(free_port())
    if not tdist.is_initialized():
        import datetime

        tdist.init_process_group(backend, rank=rank, world_size=world_size,
                                 timeout=datetime.timedelta(seconds=timeout_s))
        if rank == 0:
            where = "GPUs (CUDA)" if device.type == "cuda" else "the CPU (no GPU found; DeepSpeed's CPU accelerator)"
            log.info("%d process%s on %s, %s backend", world_size, "es" * (world_size > 1), where, backend)
    return DistEnv(rank, world_size, local_rank, device)


def leave_process_group() -> None:
    """Tear the process group down together at the end of a run. A rank that exits while its peers
    still hold connections can abort in the communication library's destructors ("terminate called
    without an active exception"), which fails a run that finished."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


LAUNCHER_ENV = "VITSCALE_LAUNCHER_PID"  # set for the ranks of `python -m launch local`
STOP_GRACE_S = 10.0  # how long stopped ranks get before SIGKILL
SAVE_NOW = signal.SIGUSR1  # what the stages take as "save at the next step boundary and stop"


def spawn_local(nproc: int, module: str, args: list[str]) -> int:
    """Run ``python -m module args`` in ``nproc`` local processes (ranks) and wait for them.

    Each rank runs in its own session, so a terminal's Ctrl-C reaches only this launcher, which
    forwards SIGUSR1, SIGTERM and SIGINT to every rank as the save-now signal (SIGUSR1); a second
    SIGTERM or SIGINT stops the ranks at once. Ranks end when this launcher dies, however it dies
    (see :func:`end_with_launcher`). When a rank fails, the others get a few seconds to end on their
    own (every rank may be failing on the same thing), then are stopped. Returns the ranks' common
    exit code (STOPPED_EXIT_CODE when they saved and stopped on a signal), or 1 when one failed
    alone (named on stderr).
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
    signals = _Forwarder(ranks)
    try:
        for command, env in commands:
            ranks.append(subprocess.Popen(command, start_new_session=True,
                                          env={**env, LAUNCHER_ENV: str(os.getpid())}))
        return _wait(ranks, signals, names or [f"rank {rank}" for rank in range(len(ranks))])
    finally:
        signals.restore()
        _stop(ranks)


def _wait(ranks: list[subprocess.Popen], signals: "_Forwarder", names: list[str]) -> int:
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
    """SIGTERM to ranks still running, SIGKILL to those alive after STOP_GRACE_S."""
    for p in ranks:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in ranks:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class _Forwarder:
    """The launcher's handlers: the first SIGUSR1/SIGTERM/SIGINT asks every rank to save and stop;
    a second SIGTERM or SIGINT stops them at once."""

    def __init__(self, ranks: list[subprocess.Popen]) -> None:
        self.ranks = ranks
        self.hard_stop = False
        self.asked = False
        self.previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, signum, frame) -> None:
        if signum != signal.SIGUSR1 and self.asked:
            self.hard_stop = True
            return
        self.asked = self.asked or signum != signal.SIGUSR1
        print(f"launcher: {signal.Signals(signum).name}: asking the ranks to save and stop"
              + (" (send it again to stop them at once)" if signum != signal.SIGUSR1 else ""), file=sys.stderr,
              flush=True)
        for p in self.ranks:
            if p.poll() is None:
                p.send_signal(SAVE_NOW)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def end_with_launcher() -> None:
    """In a rank of `python -m launch local`: die with the launcher (SIGKILL), so that no rank
    outlives it and writes a run dir another run may take over. On Linux through the kernel
    (prctl PR_SET_PDEATHSIG), elsewhere by a thread that watches the parent."""
    launcher = os.environ.get(LAUNCHER_ENV)
    if not launcher:
        return
    armed = False
    if sys.platform == "linux":
        import ctypes

        PR_SET_PDEATHSIG = 1
        armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    if not armed:
        threading.Thread(target=_watch_launcher, args=(int(launcher),), name="launcher-watch", daemon=True).start()
    if os.getppid() != int(launcher):  # it died before this was armed
        os._exit(1)


def _watch_launcher(launcher: int) -> None:
    while os.getppid() == launcher:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)


def stopped_together(exit_codes: set[int]) -> bool:
    """Whether ranks ending with ``exit_codes`` saved and stopped on a signal. A rank exits with
    STOPPED_EXIT_CODE only after every rank agreed to stop, saved and left the process group, so
    the others were done too: torch's launcher may still have ended them with SIGTERM (or SIGKILL)
    on seeing the first one exit."""
    import signal

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
