"""The ``torchrun`` backend: one node of a multi-node run under torchrun's elastic agent (c10d rendezvous), for clusters without
Slurm (Kubernetes, cloud VMs): start the same command on every node, each with its --node-rank.

The launcher checks the stage for the whole run's world size (nnodes x nproc-per-node) before anything
starts, then runs torchrun's agent (``torch.distributed.run``, max restarts 0) in a child process, this
module's :func:`agent`, which starts the node's ranks.

The run dir lock (pretrain.rundir) is held by the launcher of node rank 0 for the run's life: node
ranks are given before anything starts and exactly one node has rank 0, whereas torchrun's global rank
0 lands on whichever node the rendezvous puts first, and "the rendezvous host" is a name or address
that a node cannot reliably recognize as itself. Every node tells its ranks that the run dir is held
(so that global rank 0 does not take the lock itself). A second launch with node rank 0 on the same
run dir is refused, naming the holder.

Save signals: the launcher takes SIGUSR1/SIGTERM/SIGINT as a save request and sends SIGUSR1 to the
agent, which forwards it to its ranks (both through pretrain.processes, as every backend does). A
SIGTERM that reaches the agent or the ranks themselves (a stop of every process: systemd, a cgroup
kill, ``scancel`` of a batch job) is a save request too: torchrun's own SIGTERM handling is off (it
would SIGTERM its ranks and SIGKILL them after its shutdown timeout, mid-save), and the ranks take a
first SIGTERM as a save request (pretrain.dist.save_on_signals). The agent and its ranks run in their
own sessions, so a terminal's Ctrl-C reaches only the launcher. The ranks agree at the next step
boundary (a max-all-reduce of the stop flag), so one node's signal stops every node; they save, and
every launcher exits with STOPPED_EXIT_CODE. A second SIGTERM/SIGINT stops the node at once.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import signal
import sys
import time
from pathlib import Path

from launch.backend import Backend
from launch.stage import split_stage
from pretrain.config import ConfigError
from pretrain.dist import LAUNCHER_ENV, SAVE_NOW, STOPPED_EXIT_CODE, end_with_launcher
from pretrain.processes import SaveForwarder, describe_failure, stopped_together, supervise
from pretrain.rundir import HELD_ENV, hold

LOCK_NODE = 0  # the node rank whose launcher holds the run dir
AGENT_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"  # what torchrun's agent handles itself: all but SIGTERM (see agent)


class TorchrunBackend:
    name = "torchrun"
    help = "one node of a multi-node run under torchrun's elastic agent (c10d rendezvous): run it on every node"
    epilog = """\
Start the same command on every node, each with its --node-rank. The stage is checked for the whole
run (nnodes x nproc-per-node processes) before anything starts. Node 0's launcher holds the run dir,
which every node must see at the same path (a shared file system). SIGUSR1/SIGTERM/SIGINT to any
node's launcher make every rank save and stop (exit code 75: rerun the same commands to resume); a
second SIGTERM/SIGINT stops that node at once. A node that dies ends the run on the others.
"""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--nnodes", type=int, required=True, help="number of nodes")
        parser.add_argument("--nproc-per-node", type=int, default=1, help="processes on each node (default 1)")
        parser.add_argument("--rdzv-endpoint", required=True, metavar="HOST:PORT",
                            help="the rendezvous: a host every node reaches (typically node 0's) and a free port")
        parser.add_argument("--node-rank", type=int, default=0,
                            help="this node's rank, 0 to N-1 (default 0); node 0 holds the run dir")
        parser.add_argument("--rdzv-id", help="the run's rendezvous id (default: derived from run.dir)")
        parser.add_argument("stage", nargs=argparse.REMAINDER,
                            help="-- [pretrain] CONFIG [key=value ...] or -- finetune {full,linear,knn} CONFIG ...")

    def run(self, args: argparse.Namespace) -> int:
        return run(args.nnodes, args.nproc_per_node, args.rdzv_endpoint, args.node_rank, args.rdzv_id, args.stage)


BACKEND: Backend = TorchrunBackend()


def run(nnodes: int, nproc_per_node: int, endpoint: str, node_rank: int, rdzv_id: str | None,
        stage_tokens: list[str]) -> int:
    stage = split_stage(stage_tokens)
    for flag, value, low in (("--nnodes", nnodes, 1), ("--nproc-per-node", nproc_per_node, 1),
                             ("--node-rank", node_rank, 0)):
        if value < low:
            raise ConfigError(f"{flag} {value}: must be at least {low}")
    if node_rank >= nnodes:
        raise ConfigError(f"--node-rank {node_rank}: must be below --nnodes {nnodes}")
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--rdzv-endpoint {endpoint!r}: expected HOST:PORT")
    if not stage.argv:
        raise ConfigError("a CONFIG (recipe) is required: python -m launch torchrun --nnodes N "
                          "--nproc-per-node G --rdzv-endpoint HOST:PORT -- [STAGE] CONFIG [key=value ...]")
    stage.prepare()
    run_dir = stage.check(nnodes * nproc_per_node).run.dir  # a bad config fails here, on every node
    held = str(Path(run_dir).expanduser().absolute())
    # Both nodes derive the same id from the run dir: two runs on one endpoint never join each other.
    rdzv_id = rdzv_id or "vitscale-" + hashlib.sha256(held.encode()).hexdigest()[:16]
    command = [sys.executable, "-m", "launch.torchrun", f"--nnodes={nnodes}",
               f"--nproc-per-node={nproc_per_node}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
               f"--rdzv-id={rdzv_id}", "--max-restarts=0", f"--signals-to-handle={AGENT_SIGNALS}",
               "-m", stage.package, *stage.argv]
    with hold(run_dir) if node_rank == LOCK_NODE else contextlib.nullcontext():
        env = dict(os.environ, **{HELD_ENV: held})
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
        return supervise([(command, env)], names=[f"node {node_rank}'s torchrun agent"])


def agent(argv: list[str]) -> int:
    """torchrun's agent for this node (argv: torchrun's arguments), as a child of the launcher.

    It dies with the launcher, and its ranks with it (VITSCALE_LAUNCHER_PID, see
    pretrain.dist.end_with_launcher); it forwards SIGUSR1 to its ranks; it exits with
    STOPPED_EXIT_CODE when its ranks saved and stopped, 1 with a message naming the first rank that
    failed otherwise."""
    # First: a save request must never kill the agent. It goes to the ranks once they handle it. So
    # does a SIGTERM (torchrun is told to leave it alone: it would SIGTERM the ranks and SIGKILL them
    # after its shutdown timeout, mid-save); a second one ends the agent, and its ranks with it.
    SaveForwarder(_ranks, listen=(SAVE_NOW, signal.SIGTERM), escalate=True, on_hard_stop=_stop_at_once)
    end_with_launcher()
    os.environ[LAUNCHER_ENV] = str(os.getpid())  # inherited by the ranks: they end with this agent
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run as torchrun

    args = parse_args(argv)
    try:
        torchrun(args)  # not torch's main(): its @record prints a second report of failures
    except ChildFailedError as e:
        codes = {failure.exitcode for failure in e.failures.values()}
        if stopped_together(codes):
            _wait_for_the_other_nodes(args)
            return STOPPED_EXIT_CODE
        rank, failure = min(e.failures.items(), key=lambda item: (item[1].timestamp, item[0]))
        print(f"error: {describe_failure(rank, failure.pid, failure.exitcode)}; torchrun stopped this node's other "
              f"ranks and the run is over (a rank whose collective failed lost a peer: the first failure is in "
              f"another node's log)", file=sys.stderr, flush=True)
        return 1
    except RendezvousError as e:
        print(f"error: lost torchrun's rendezvous at {args.rdzv_endpoint} ({e}): the node that hosts it is gone, "
              f"or unreachable; the run is over and this node's ranks were stopped", file=sys.stderr, flush=True)
        return 1
    return 0


def _wait_for_the_other_nodes(args, timeout_s: float = 30.0) -> None:
    """After a stop, wait (at most ``timeout_s``) until every node's ranks stopped. torchrun keeps its
    agents together at the end only when the ranks succeed (its exit barrier); ranks that saved and
    exit 75 "failed", and the agent hosting the rendezvous store would leave at once, so that another
    node's agent, whose ranks are still exiting, loses the store and stops them as a failure."""
    import datetime

    from torch.distributed import TCPStore

    host, _, port = args.rdzv_endpoint.rpartition(":")
    key = f"vitscale/{args.rdzv_id}/stopped-nodes"
    try:
        store = TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
        stopped = store.add(key, 1)
        deadline = time.monotonic() + timeout_s
        while stopped < int(args.nnodes) and time.monotonic() < deadline:
            time.sleep(0.1)
            stopped = store.add(key, 0)
    except (RuntimeError, ValueError):  # the store is gone: its host left, there is nobody to wait for
        pass


def _stop_at_once() -> None:
    """A second SIGTERM to the agent: it exits, and its ranks end with it (end_with_launcher)."""
    print("torchrun agent: SIGTERM again: stopping this node's ranks at once", file=sys.stderr, flush=True)
    os._exit(1)


def _ranks() -> list[int]:
    """The agent's children: the ranks torchrun started on this node."""
    import psutil

    return [child.pid for child in psutil.Process().children()]


if __name__ == "__main__":
    sys.exit(agent(sys.argv[1:]))
