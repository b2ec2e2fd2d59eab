"""The ``local`` backend: N processes on this machine. Check the stage first, hold the run dir, then
start the ranks (pretrain.processes.spawn_local: save signals forwarded, ranks end with the launcher)."""

from __future__ import annotations

import argparse

from launch.backend import Backend
from launch.stage import split_stage
from pretrain.config import ConfigError
from pretrain.errors import reported
from pretrain.processes import spawn_local
from pretrain.rundir import hold


class LocalBackend:
    name = "local"
    help = ("N processes on this machine; SIGUSR1/SIGTERM/SIGINT are forwarded to them as a save request, they end "
            "with the launcher")
    epilog = None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--nproc", type=int, default=1, help="number of processes (default 1)")
        parser.add_argument("stage", nargs=argparse.REMAINDER,
                            help="[pretrain] CONFIG [key=value ...] or finetune {full,linear,knn} CONFIG "
                                 "[key=value ...]; a leading '--' is allowed")

    def run(self, args: argparse.Namespace) -> int:
        return run(args.nproc, args.stage)


BACKEND: Backend = LocalBackend()


def run(nproc: int, stage_tokens: list[str]) -> int:
    """``launch local --nproc N STAGE``; ConfigError, ShardError or RunDirBusy before any process starts."""
    return reported(_run, nproc, stage_tokens)


def _run(nproc: int, stage_tokens: list[str]) -> int:
    stage = split_stage(stage_tokens)
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: must be at least 1")
    if not stage.argv:
        raise ConfigError("a CONFIG (recipe) is required: python -m launch local --nproc N [STAGE] CONFIG "
                          "[key=value ...]")
    stage.prepare()
    cfg = stage.check(nproc)  # a bad config fails here, before any process starts
    with hold(cfg.run.dir):  # for the ranks' whole life: a second run on this run dir is refused
        return spawn_local(nproc, stage.package, stage.argv)
