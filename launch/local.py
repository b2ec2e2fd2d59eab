"""N processes on this machine: check everything first, hold the run dir, then start the ranks
(pretrain.dist.spawn_local: save signals forwarded, ranks end with the launcher)."""

from __future__ import annotations

import sys

from pretrain.config import ConfigError
from pretrain.data.shards import ShardError
from pretrain.dist import spawn_local
from pretrain.rundir import RunDirBusy, hold


def check_pretrain(args: list[str], nproc: int) -> str:
    from pretrain.__main__ import preflight
    from pretrain.config import load_config

    cfg = load_config(args[0], args[1:])
    preflight(cfg, nproc)
    return cfg.run.dir


def check_finetune(args: list[str], nproc: int) -> str:
    from finetune.__main__ import check, load

    check(args, nproc)
    return load(args[0], args[1], args[2:]).run.dir


# Each stage's checks, run here before any process starts (stages are imported lazily); they
# return the run dir.
STAGES = {"pretrain": check_pretrain, "finetune": check_finetune}


def split_stage(stage_args: list[str]) -> tuple[str, list[str]]:
    """``[--] [pretrain | finetune] CONFIG ...`` as (stage, its arguments); the stage defaults to pretrain."""
    args = list(stage_args)
    if args and args[0] == "--":
        args = args[1:]
    return (args.pop(0) if args and args[0] in STAGES else "pretrain"), args


def run(nproc: int, stage_args: list[str]) -> int:
    stage, args = split_stage(stage_args)
    if nproc < 1:
        print(f"error: --nproc {nproc}: must be at least 1", file=sys.stderr)
        return 2
    if not args:
        print("error: a CONFIG (recipe) is required: python -m launch local --nproc N [STAGE] CONFIG [key=value ...]",
              file=sys.stderr)
        return 2
    try:
        run_dir = STAGES[stage](args, nproc)  # a bad config fails here, before any process starts
        with hold(run_dir):  # for the ranks' whole life: a second run on this run dir is refused
            return spawn_local(nproc, stage, args)
    except (ConfigError, ShardError, RunDirBusy) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
