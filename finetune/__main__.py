"""python -m finetune {full,linear,knn} CONFIG pretrained=PATH [key=value ...] [--print-config]

After pre-training: full fine-tuning (supervised, from the pre-trained weights, through the
pre-training trainer), a linear probe and a kNN classifier on frozen features. One process here;
several with ``python -m launch local --nproc N -- finetune STAGE CONFIG ...``.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from finetune.config import ROOTS, FullConfig
from pretrain.config import ConfigError, dump_config, load_config
from pretrain.dist import STOPPED_EXIT_CODE, exit_without_teardown
from pretrain.errors import CheckpointError, reported

from finetune.reference import STAGE_MODULES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m finetune", description=__doc__.split("\n\n")[1])
    parser.add_argument("stage", choices=sorted(STAGE_MODULES), help="full fine-tuning, linear probe or kNN")
    parser.add_argument("config", help="YAML recipe (configs/finetune/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. pretrained=runs/demo")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def load(stage: str, config: str, overrides: list[str]):
    """The stage's checked config; for ``full``, with the model the pre-trained source describes."""
    from finetune.weights import resolve_model

    cfg = load_config(config, overrides, root=ROOTS[stage])
    if cfg.pretrained is not None and not Path(cfg.pretrained).expanduser().exists():
        raise ConfigError(f"pretrained={cfg.pretrained!r}: no such file or directory")
    if isinstance(cfg, FullConfig):
        cfg.model = resolve_model(cfg.model, cfg.pretrained)
    return cfg


def preflight(stage: str, cfg, world_size: int) -> None:
    """What can be checked before any process starts: the model exists, the data is there (written
    before, when ``data.prepare`` names a built-in data set). Writes nothing."""
    import timm

    from pretrain.plan import resolve_sources

    if isinstance(cfg, FullConfig):
        from pretrain.__main__ import preflight as pretrain_preflight

        pretrain_preflight(cfg, world_size)
        return
    from finetune.features import check_features
    from finetune.weights import resolve_model

    model = resolve_model(cfg.model, cfg.pretrained)
    if not timm.is_model(model.name):
        raise ConfigError(f"model.name={model.name!r}: timm has no such model")
    check_features(cfg, model)
    resolve_sources(cfg)


def _command(argv: list[str]) -> tuple[str, str, list[str]]:
    """``STAGE CONFIG [key=value ...]`` as (stage, recipe, overrides), or a ConfigError saying what is missing."""
    if not argv or argv[0] not in STAGE_MODULES:
        raise ConfigError(f"finetune needs a stage, one of {sorted(STAGE_MODULES)}: finetune STAGE CONFIG ...")
    if len(argv) < 2:
        raise ConfigError(f"finetune {argv[0]}: a CONFIG (recipe) is required")
    return argv[0], argv[1], argv[2:]


def config(argv: list[str]):
    """For launchers: the config of ``STAGE CONFIG [key=value ...]``, checked on its own but not against
    the world (``pretrained`` may name what an earlier stage of a chain will write)."""
    stage, recipe, overrides = _command(argv)
    return load_config(recipe, overrides, root=ROOTS[stage])


def prepare(argv: list[str]) -> None:
    """For launchers, before :func:`check`: write the built-in data set ``data.prepare`` names, unless it is there."""
    from pretrain.data.builtin import prepare_data

    prepare_data(config(argv).data)


def check(argv: list[str], world_size: int):
    """For launchers: ``STAGE CONFIG [key=value ...]`` loaded (the pre-trained weights found) and checked
    for ``world_size`` processes before any starts (ConfigError/ShardError naming the key or file); the config.
    Writes nothing."""
    stage, recipe, overrides = _command(argv)
    cfg = load(stage, recipe, overrides)
    preflight(stage, cfg, world_size)
    return cfg


def run(stage: str, cfg):
    """Run ``stage`` in this process (one rank of a distributed run, or alone); what its ``run`` returns."""
    import torch

    from finetune.reference import run_with_reference
    from pretrain.dist import init_distributed, leave_process_group

    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    dist = init_distributed()
    result = run_with_reference(stage, cfg, dist)
    leave_process_group()
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Full fine-tuning resumes and saves through pre-training's trainer: its CheckpointError is a failed run.
    return reported(_main, parse_args(argv), failures=(CheckpointError,))


def _main(args: argparse.Namespace) -> int:
    cfg = load(args.stage, args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    if "WORLD_SIZE" not in os.environ:  # alone; a launcher prepared and checked before starting the ranks
        from pretrain.data.builtin import prepare_data

        prepare_data(cfg.data)
        preflight(args.stage, cfg, 1)
    if run(args.stage, cfg).get("state") == "stopped":  # full fine-tuning saved and stopped on a signal
        return STOPPED_EXIT_CODE
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())
