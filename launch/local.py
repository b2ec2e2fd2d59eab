"""N processes on this machine: check everything first, then start them with torch's launcher."""

from __future__ import annotations

import sys

from pretrain.config import ConfigError
from pretrain.data.shards import ShardError
from pretrain.dist import spawn_local


def check_pretrain(args: list[str], nproc: int) -> None:
    from pretrain.__main__ import preflight
    from pretrain.config import load_config

    preflight(load_config(args[0], args[1:]), nproc)


def check_finetune(args: list[str], nproc: int) -> None:
    from finetune.__main__ import check

    check(args, nproc)


# Each stage's checks, run here before any process starts (stages are imported lazily).
STAGES = {"pretrain": check_pretrain, "finetune": check_finetune}


def run(nproc: int, stage_args: list[str]) -> int:
    args = list(stage_args)
    if args and args[0] == "--":
        args = args[1:]
    stage = args.pop(0) if args and args[0] in STAGES else "pretrain"
    if nproc < 1:
        print(f"error: --nproc {nproc}: must be at least 1", file=sys.stderr)
        return 2
    if not args:
        print("error: a CONFIG (recipe) is required: python -m launch local --nproc N [STAGE] CONFIG [key=value ...]",
              file=sys.stderr)
        return 2
    try:
        STAGES[stage](args, nproc)  # a bad config fails here, before any process starts
    except (ConfigError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return spawn_local(nproc, stage, args)
