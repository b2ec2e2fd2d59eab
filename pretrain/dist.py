"""Process topology from the environment (torchrun, srun, or a single process) and small collectives.

Nothing here is global: callers hold a :class:`DistEnv` and pass it on.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
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

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank; a collective."""
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size
        tdist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj, src: int = 0):
        if self.world_size == 1:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]


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


def spawn_local(nproc: int, module: str, args: list[str]) -> int:
    """Run ``python -m module args`` in ``nproc`` local processes through torch.distributed's launcher.

    Returns the exit code: non-zero as soon as any process fails (the others are stopped), and
    STOPPED_EXIT_CODE when the ranks that ended first all saved and stopped on a signal.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    launcher_args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "--module", module, *args])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        run(launcher_args)
    except ChildFailedError as e:  # torchrun stopped the other ranks and printed its report above
        if stopped_together({f.exitcode for f in e.failures.values()}):
            print(f"stopped: the ranks saved and stopped before the end of the run (exit code "
                  f"{STOPPED_EXIT_CODE}); rerun the same command to resume", file=sys.stderr)
            return STOPPED_EXIT_CODE
        rank, failure = e.get_first_failure()
        print(f"error: {describe_failure(rank, failure.pid, failure.exitcode)}; the other ranks were stopped",
              file=sys.stderr)
        return 1
    except Exception as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


def stopped_together(exit_codes: set[int]) -> bool:
    """Whether ranks ending with ``exit_codes`` saved and stopped on a signal. A rank exits with
    STOPPED_EXIT_CODE only after every rank agreed to stop, saved and left the process group, so
    the others were done too: torch's launcher may still have ended them with SIGTERM (or SIGKILL)
    on seeing the first one exit."""
    import signal

    return STOPPED_EXIT_CODE in exit_codes and exit_codes <= {STOPPED_EXIT_CODE, -signal.SIGTERM, -signal.SIGKILL}


def describe_failure(rank: int, pid: int, exitcode: int) -> str:
    """One line naming a lost rank and how it ended (a negative exit code is the signal that killed it)."""
    if exitcode < 0:
        import signal

        try:
            how = f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"killed by signal {-exitcode}"
    else:
        how = f"exited with code {exitcode}"
    return f"rank {rank} (pid {pid}) died: {how}"
