"""N processes on this machine: check everything first, then start them with torch's launcher."""

from __future__ import annotations

import sys

from pretrain.__main__ import preflight
from pretrain.config import ConfigError, load_config
from pretrain.data.shards import ShardError
from pretrain.dist import spawn_local

STAGES = {"pretrain"}


def run(nproc: int, stage_args: list[str]) -> int:
    args = list(stage_args)
    if args and args[0] == "--":
        args = args[1:]
    stage = args.pop(0) if args and args[0] in STAGES else "pretrain"
    if nproc < 1:
        print(f"error: --nproc {nproc}: must be at least 1", file=sys.stderr)
        return 2
    if not args:
        print("error: a CONFIG (recipe) is required: python -m launch local --nproc N CONFIG [key=value ...]",
              file=sys.stderr)
        return 2
    config, overrides = args[0], args[1:]
    try:
        cfg = load_config(config, overrides)  # a bad config fails here, before any process starts
        preflight(cfg, nproc)
    except (ConfigError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return spawn_local(nproc, stage, [config, *overrides])
