"""python -m launch {local,torchrun,slurm,status} ...

  local     --nproc N [pretrain | finetune {full,linear,knn}] CONFIG [key=value ...]
  torchrun  --nnodes N --nproc-per-node G --rdzv-endpoint HOST:PORT [--node-rank R] [--rdzv-id ID] -- STAGE
  slurm  [options] -- STAGE [-- STAGE ...]     STAGE: pretrain CONFIG [k=v ...] | finetune MODE CONFIG [k=v ...]
  status RUN_DIR
"""

from __future__ import annotations

import argparse
import sys

SLURM_EPILOG = """\
Each STAGE after '--' is a job; several stages ('-- pretrain A.yaml -- finetune linear B.yaml') form a
chain, each starting after the previous one succeeded. An override with several values
('optim.lr=1e-3,2e-3') makes a sweep: a job array with one run dir per point under run.dir.
A job that reaches its time limit or is preempted saves, requeues itself and resumes.
"""

TORCHRUN_EPILOG = """\
Start the same command on every node, each with its --node-rank. The stage is checked for the whole
run (nnodes x nproc-per-node processes) before anything starts. Node 0's launcher holds the run dir,
which every node must see at the same path (a shared file system). SIGUSR1/SIGTERM/SIGINT to any
node's launcher make every rank save and stop (exit code 75: rerun the same commands to resume); a
second SIGTERM/SIGINT stops that node at once. A node that dies ends the run on the others.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch", description="Run a stage on some processes.")
    where = parser.add_subparsers(dest="where", required=True)
    local = where.add_parser("local", help="N processes on this machine; SIGUSR1/SIGTERM/SIGINT are forwarded to them "
                                                "as a save request, they end with the launcher")
    local.add_argument("--nproc", type=int, default=1, help="number of processes (default 1)")
    local.add_argument("stage", nargs=argparse.REMAINDER,
                       help="[pretrain] CONFIG [key=value ...] or finetune {full,linear,knn} CONFIG [key=value ...]; "
                            "a leading '--' is allowed")

    torchrun = where.add_parser(
        "torchrun", help="one node of a multi-node run under torchrun's elastic agent (c10d rendezvous): run it "
                         "on every node", epilog=TORCHRUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    torchrun.add_argument("--nnodes", type=int, required=True, help="number of nodes")
    torchrun.add_argument("--nproc-per-node", type=int, default=1, help="processes on each node (default 1)")
    torchrun.add_argument("--rdzv-endpoint", required=True, metavar="HOST:PORT",
                          help="the rendezvous: a host every node reaches (typically node 0's) and a free port")
    torchrun.add_argument("--node-rank", type=int, default=0,
                          help="this node's rank, 0 to N-1 (default 0); node 0 holds the run dir")
    torchrun.add_argument("--rdzv-id", help="the run's rendezvous id (default: derived from run.dir)")
    torchrun.add_argument("stage", nargs=argparse.REMAINDER,
                          help="-- [pretrain] CONFIG [key=value ...] or -- finetune {full,linear,knn} CONFIG ...")

    slurm = where.add_parser("slurm", help="submitit jobs on Slurm (chains, sweeps, requeue)",
                             epilog=SLURM_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    slurm.add_argument("--profile", help="cluster profile: configs/launch/NAME.yaml or a path; flags override it")
    slurm.add_argument("--nodes", type=int)
    slurm.add_argument("--gpus-per-node", type=int, help="default 0 (CPU, gloo)")
    slurm.add_argument("--tasks-per-node", type=int, help="default: --gpus-per-node, or 1 without GPUs")
    slurm.add_argument("--cpus-per-task", type=int)
    slurm.add_argument("--mem", help="memory per node, e.g. 64G")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--constraint")
    slurm.add_argument("--time", help="time limit per job: minutes or [D-]HH:MM[:SS] (default 60)")
    slurm.add_argument("--exclude", help="nodes to avoid")
    slurm.add_argument("--max-requeues", type=int, help="requeues after time limits or preemptions (default 3)")
    slurm.add_argument("--signal-delay-s", type=int,
                       help="seconds before the time limit to save and requeue (default 120)")
    slurm.add_argument("--job-name")
    slurm.add_argument("--dry-run", action="store_true", help="print the sbatch scripts and configs; submit nothing")
    slurm.add_argument("stage", nargs=argparse.REMAINDER, help="-- STAGE [-- STAGE ...]")

    status = where.add_parser("status", help="a run's Slurm jobs, states, requeues, step, checkpoint, errors")
    status.add_argument("run_dir")
    args = parser.parse_args(argv)

    if args.where == "local":
        from launch.local import run

        return run(args.nproc, args.stage)
    if args.where == "torchrun":
        from launch.torchrun import run

        return run(args.nnodes, args.nproc_per_node, args.rdzv_endpoint, args.node_rank, args.rdzv_id, args.stage)
    if args.where == "status":
        from launch.status import show

        return show(args.run_dir)
    return _slurm(args)


def _slurm(args: argparse.Namespace) -> int:
    from launch.spec import SlurmOptions, resolve_options
    from pretrain.config import ConfigError
    from pretrain.data.shards import ShardError

    flags = {name: getattr(args, name) for name in SlurmOptions.__dataclass_fields__ if hasattr(args, name)}
    try:
        options = resolve_options(args.profile, flags)
        from launch.slurm import run

        return run(options, args.stage, dry_run=args.dry_run)
    except (ConfigError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
