"""Process topology from the environment (torchrun, srun, or a single process) and small collectives.

Nothing here is global: callers hold a :class:`DistEnv` and pass it on.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, NoReturn

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
        return _SumOverRanks.apply(tensor)
    return tensor


class _SumOverRanks(torch.autograd.Function):
    """Every rank's output is the sum of every rank's input, so each input's gradient is the sum of
    every output's. On functional collectives, which torch.compile traces (torch.distributed.nn's
    all-reduce breaks the graph)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        from torch.distributed import _functional_collectives as funcol

        return funcol.wait_tensor(funcol.all_reduce(tensor, "sum", tdist.group.WORLD))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        from torch.distributed import _functional_collectives as funcol

        return funcol.wait_tensor(funcol.all_reduce(grad.contiguous(), "sum", tdist.group.WORLD))


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


LAUNCHER_ENV = "VITSCALE_LAUNCHER_PID"  # set by a launcher for the processes it starts (pretrain.processes)
SAVE_NOW = signal.SIGUSR1  # what the stages take as "save at the next step boundary and stop"


def save_on_signals(request_save: Callable[[], None]) -> None:
    """SAVE_NOW (the launchers' save request) calls ``request_save``; so does a first SIGTERM, and a
    second SIGTERM ends the process at once.

    A rank gets SIGTERM itself when every process of a run is signalled (``scancel`` of a batch job
    that runs a launcher, ``systemctl stop``, a cgroup-wide kill, ``pkill``): killed by it, the ranks
    lose the work since the last checkpoint while their launcher asks them to save. SIGTERM is left
    alone where this process already handles it (a Slurm task's forwarder, launch.slurm.SaveRequest,
    which tells a cancellation from a requeue)."""
    signal.signal(SAVE_NOW, lambda signum, frame: request_save())
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def on_sigterm(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the next one ends the process
        request_save()

    signal.signal(signal.SIGTERM, on_sigterm)


def exit_without_teardown(code: int) -> NoReturn:
    """End a stage's process (``python -m pretrain`` / ``finetune``) with ``code``, skipping the
    interpreter's teardown. DeepSpeed keeps the gloo process group referenced after
    ``destroy_process_group`` (its groups module, each engine, each ZeRO-3 parameter), so gloo's
    backend is destroyed only in that teardown, where it can abort ("terminate called without an
    active exception", SIGABRT): a rank that finished and saved then "dies", and its launcher
    reports a failure. Everything the stage writes is on disk by then; what the teardown would still
    do is done here: the data workers ended, the logs and output flushed."""
    from pretrain.data.workers import end_all_workers

    end_all_workers()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def end_with_launcher() -> None:
    """In a process started by a launcher (pretrain.processes): die with it (SIGKILL), so that no rank
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
