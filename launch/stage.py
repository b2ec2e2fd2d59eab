"""A stage as every backend sees it: one package's command line (``pretrain CONFIG k=v ...``,
``finetune linear CONFIG k=v ...``).

Each stage package's ``__main__`` exposes the same four functions, imported here lazily:
``main(argv) -> exit code`` runs it (in-process: one rank), ``prepare(argv)`` writes the built-in
data set its config's ``data.prepare`` names (before the checks, which read it),
``check(argv, world_size) -> config`` does its pre-flight checks for a world size (config, model,
data, batch arithmetic; ConfigError or ShardError naming the key or file; it writes nothing), and
``config(argv) -> config`` only loads its config (for a chain's later stage, whose inputs an earlier
stage writes). Backends know no stage by name.
"""

from __future__ import annotations

import importlib
import shlex
from dataclasses import dataclass
from pathlib import Path

from pretrain.config import ConfigError, dump_config

STAGE_PACKAGES = ("pretrain", "finetune")
DEFAULT_PACKAGE = "pretrain"  # `launch local --nproc 2 CONFIG` pre-trains


@dataclass
class Stage:
    """One entry point's command line: ``package [mode] CONFIG key=value ...``."""

    package: str
    argv: list[str]  # what the package's main(argv) receives

    @property
    def config_path(self) -> str | None:
        return next((a for a in self.argv if a.endswith((".yaml", ".yml"))), None)

    @property
    def overrides(self) -> list[str]:
        return [a for a in self.argv if "=" in a and not a.startswith("-")]

    def with_overrides(self, overrides: list[str]) -> "Stage":
        """The same command line with ``overrides`` in place of its own."""
        kept = [a for a in self.argv if a not in self.overrides]
        return Stage(self.package, kept + overrides)

    def command_line(self) -> str:
        return " ".join(shlex.quote(a) for a in ["python", "-m", self.package, *self.argv])

    def _entry(self):
        return importlib.import_module(f"{self.package}.__main__")

    def config(self):
        """The stage's config, loaded and checked on its own (not against a world size or its inputs)."""
        return self._entry().config(list(self.argv))

    def prepare(self) -> None:
        """Write what the stage's config asks to be prepared (``data.prepare``), before :meth:`check`."""
        self._entry().prepare(list(self.argv))

    def check(self, world_size: int):
        """The stage's pre-flight checks for ``world_size`` processes; its config."""
        return self._entry().check(list(self.argv), world_size)

    def main(self) -> int:
        """Run the stage in this process (one rank); its exit code."""
        return self._entry().main(list(self.argv))

    def run_dir(self, cfg=None) -> Path:
        """The run dir of ``cfg`` (default: the stage's config), absolute."""
        run_dir = (cfg or self.config()).run.dir
        if not run_dir:
            raise ConfigError(f"{self.command_line()}: set run.dir: the launcher keeps the job's logs there")
        return Path(run_dir).expanduser().resolve()

    def describe_config(self) -> str:
        return dump_config(self.config())


def split_stage(tokens: list[str]) -> Stage:
    """``[--] [pretrain | finetune] CONFIG ...`` (one stage; the package defaults to pretrain)."""
    args = list(tokens)
    if args and args[0] == "--":
        args = args[1:]
    package = args.pop(0) if args and args[0] in STAGE_PACKAGES else DEFAULT_PACKAGE
    return Stage(package, args)


def parse_stages(tokens: list[str]) -> list[Stage]:
    """``[--] STAGE [-- STAGE ...]``: a chain, each stage a package name and its arguments."""
    stages, current = [], []
    for token in [*tokens, "--"]:
        if token != "--":
            current.append(token)
            continue
        if current:
            if current[0] not in STAGE_PACKAGES:
                raise ConfigError(f"stage {' '.join(current)!r}: must start with one of {', '.join(STAGE_PACKAGES)} "
                                  "(e.g. `-- pretrain configs/pretrain/demo.yaml`)")
            stages.append(Stage(current[0], current[1:]))
        current = []
    if not stages:
        raise ConfigError("no stage given: python -m launch slurm [options] -- pretrain CONFIG [key=value ...]")
    return stages
