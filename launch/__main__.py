"""python -m launch {local,torchrun,slurm,status} ...

  local     --nproc N [pretrain | finetune {full,linear,knn}] CONFIG [key=value ...]
  torchrun  --nnodes N --nproc-per-node G --rdzv-endpoint HOST:PORT [--node-rank R] [--rdzv-id ID] -- STAGE
  slurm  [options] -- STAGE [-- STAGE ...]     STAGE: pretrain CONFIG [k=v ...] | finetune MODE CONFIG [k=v ...]
  status RUN_DIR
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pretrain.errors import reported

BACKENDS = ("local", "torchrun", "slurm")  # modules of this package, each with a BACKEND (launch.backend)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch", description="Run a stage on some processes.")
    where = parser.add_subparsers(dest="where", required=True)
    backends = {name: importlib.import_module(f"launch.{name}").BACKEND for name in BACKENDS}
    for backend in backends.values():
        backend.add_arguments(where.add_parser(backend.name, help=backend.help, epilog=backend.epilog,
                                               formatter_class=argparse.RawDescriptionHelpFormatter))

    status = where.add_parser("status", help="a run's Slurm jobs, states, requeues, step, checkpoint, errors")
    status.add_argument("run_dir")
    args = parser.parse_args(argv)

    if args.where == "status":
        from launch.status import show

        return show(args.run_dir)
    return reported(backends[args.where].run, args)


if __name__ == "__main__":
    sys.exit(main())
