"""python -m launch local --nproc N [pretrain | finetune {full,linear,knn}] CONFIG [key=value ...]"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch", description="Run a stage on some processes.")
    where = parser.add_subparsers(dest="where", required=True)
    local = where.add_parser("local", help="N processes on this machine (torch.distributed's launcher)")
    local.add_argument("--nproc", type=int, default=1, help="number of processes (default 1)")
    local.add_argument("stage", nargs=argparse.REMAINDER,
                       help="[pretrain] CONFIG [key=value ...] or finetune {full,linear,knn} CONFIG [key=value ...]; "
                            "a leading '--' is allowed")
    args = parser.parse_args(argv)
    from launch.local import run

    return run(args.nproc, args.stage)


if __name__ == "__main__":
    sys.exit(main())
