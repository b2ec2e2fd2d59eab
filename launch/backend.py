"""What a launch backend is: where a stage runs (``python -m launch NAME [flags] -- STAGE``).

A backend is a module of this package (``launch/NAME.py``) with a ``BACKEND`` object that has:

- ``name``, ``help`` and ``epilog`` (its subcommand's ``--help``);
- ``add_arguments(parser)``: its flags, and the stage tokens (argparse.REMAINDER) as ``stage``;
- ``run(args) -> exit code``: check the stage (launch.stage: ``Stage.check(world_size)``, the stage
  package's own pre-flight checks) before anything starts or is written, then start it. Save signals
  reach the stage through pretrain.processes (``supervise`` or ``SaveForwarder``), so that every
  backend stops the same way: ranks save at the next step boundary and exit with STOPPED_EXIT_CODE.

A backend raises ConfigError, ShardError or RunDirBusy (pretrain.errors.UserError) for what the user must
fix; ``launch.__main__`` reports them (pretrain.errors.reported: ``error: ...``, exit code 2). Backends
are listed in ``launch.__main__.BACKENDS``.
"""

from __future__ import annotations

import argparse
from typing import Protocol


class Backend(Protocol):
    name: str
    help: str
    epilog: str | None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...

