"""python -m pretrain [CONFIG] [key=value ...] [--print-config]

With no arguments: the demo. It writes shards of scikit-learn's digits on first use, pre-trains a
tiny ViT with MoBY for about two minutes with 2 processes on this machine, exports it, and prints the
accuracy of a linear probe on its frozen features next to the same model at random initialization.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from pretrain import DEMO_RECIPE
from pretrain.config import Config, ConfigError, dump_config, for_world_size, load_config
from pretrain.dist import STOPPED_EXIT_CODE, exit_without_teardown
from pretrain.errors import CheckpointError, reported
from pretrain.step_guard import NonFiniteLossError

DEMO_PROCESSES = 2


def parse_args(argv: list[str] | None, prog: str = "python -m pretrain") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description="Pre-train a Swin or ViT backbone.",
                                     epilog="With no arguments, runs the demo recipe "
                                            f"({DEMO_RECIPE.relative_to(DEMO_RECIPE.parents[2])}) on 2 processes. "
                                            "Exit codes: 0 done (or ended at train.stop_at), 1 failed, 2 bad config "
                                            f"or data, {STOPPED_EXIT_CODE} saved and stopped on a signal (SIGUSR1) "
                                            "before train.steps: rerun to resume.")
    parser.add_argument("config", nargs="?", help="YAML recipe (configs/pretrain/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.batch_size=128")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.config)  # only overrides, no recipe
        args.config = None
    return args


def preflight(cfg: Config, world_size: int) -> None:
    """Everything that can be checked before any process starts: data present, arithmetic sound.
    Writes nothing: the built-in data set ``data.prepare`` names is written before (:func:`prepare`)."""
    import timm

    from pretrain.dist import DistEnv
    from pretrain.engine import check_accelerator, check_deepspeed_overrides, check_offload, resolve_autocast
    from pretrain.objectives.base import RunContext
    from pretrain.objectives.build import check_model_inputs
    from pretrain.rundir import check_run_dir
    from pretrain.plan import check_resume, make_plan, resolve_sources
    from pretrain.state.checkpointer import checkpoint_precision

    cfg = resolve_autocast(for_world_size(cfg, world_size), checkpoint_precision(cfg))
    check_run_dir(cfg.run.dir)
    if not timm.is_model(cfg.model.name):
        raise ConfigError(f"model.name={cfg.model.name!r}: timm has no such model")
    check_accelerator(cfg.engine.precision)
    check_offload(cfg)
    check_deepspeed_overrides(cfg, world_size)
    train_set, _ = resolve_sources(cfg)
    plan = make_plan(cfg, world_size, train_set)
    check_resume(cfg, world_size, train_set)
    check_model_inputs(cfg, RunContext(plan.num_classes, plan.total_steps, plan.steps_per_epoch,
                                       DistEnv(world_size=world_size), cfg.engine.precision, cfg.engine.autocast))


def config(argv: list[str]) -> Config:
    """For launchers: the stage's config from its command line (``[CONFIG] [key=value ...]``), checked
    on its own but not against the world (a chain's later stage may read what an earlier one writes)."""
    args = parse_args(argv)
    return load_config(args.config, args.overrides)


def prepare(argv: list[str]) -> None:
    """For launchers, before :func:`check`: write the built-in data set the config's ``data.prepare``
    names (the demo's digits), unless it is there."""
    from pretrain.data.builtin import prepare_data

    prepare_data(config(argv).data)


def check(argv: list[str], world_size: int) -> Config:
    """For launchers: the command line's config, checked for ``world_size`` processes before any
    starts (ConfigError or ShardError naming the key, file or value); writes nothing."""
    cfg = config(argv)
    preflight(cfg, world_size)
    return cfg


def train(cfg: Config) -> str:
    """Train in this process (one rank of a distributed run, or alone); how it ended (Trainer.state)."""
    import contextlib

    import torch

    from pretrain.dist import init_distributed, leave_process_group, topology_from_environment
    from pretrain.rundir import hold
    from pretrain.trainer import Trainer

    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    # One run per run dir: held here by a single process or rank 0 of a job (srun, torchrun); a no-op
    # under `python -m launch local`, which holds it for its ranks.
    with hold(cfg.run.dir) if topology_from_environment()[0] == 0 else contextlib.nullcontext():
        dist = init_distributed()
        cfg = for_world_size(cfg, dist.world_size)
        trainer = Trainer(cfg, dist)
        trainer.stop_on_signal()
        trainer.fit()
        if dist.is_main:
            print(f"run dir: {cfg.run.dir}\n  TensorBoard: tensorboard --logdir {Path(cfg.run.dir) / 'tb'}\n"
                  f"  checkpoints: {trainer.checkpointer.directory}\n  export: {export_line(cfg, trainer)}")
        leave_process_group()
    return trainer.state


def export_line(cfg: Config, trainer) -> str:
    """Where the export is, or why there is none yet (a run that ended before train.steps exports nothing)."""
    if trainer.state == "finished" and cfg.train.export:
        return str(Path(cfg.run.dir) / "export")
    if trainer.state == "finished":
        return "none (train.export=false)"
    how = ("it stopped on a signal; rerun the same command" if trainer.state == "stopped"
           else "train.stop_at; rerun without it")
    return f"none yet: the run ended at step {trainer.step} of {trainer.plan.total_steps} ({how} to finish and export)"


def run_demo() -> int:
    from pretrain.processes import spawn_local
    from pretrain.rundir import hold

    from pretrain.data.builtin import prepare_data

    cfg = load_config(DEMO_RECIPE)
    prepare_data(cfg.data)  # the demo's digits, on first use
    preflight(cfg, DEMO_PROCESSES)
    print(f"vitscale demo: {DEMO_RECIPE.name} on {DEMO_PROCESSES} processes, run dir {cfg.run.dir}", flush=True)
    with hold(cfg.run.dir):
        code = spawn_local(DEMO_PROCESSES, "pretrain", [str(DEMO_RECIPE)])
    if code == 0:
        probe_demo(cfg)
    return code


def probe_demo(cfg: Config) -> None:
    """Linear probes (logistic regression) on the exported backbone and on its random init."""
    import torch

    from pretrain.models.backbone import create_backbone
    from pretrain.export import load_export
    from pretrain.probe import probe_accuracy, raw_pixel_accuracy

    torch.set_num_threads(cfg.run.threads or torch.get_num_threads())
    size, mean, std = cfg.data.image_size, cfg.data.mean, cfg.data.std
    trained = probe_accuracy(load_export(Path(cfg.run.dir) / "export"), cfg.data.train, size, mean, std)
    torch.manual_seed(cfg.run.seed)  # the initial weights of the run
    initial = probe_accuracy(create_backbone(cfg.model, size, 0), cfg.data.train, size, mean, std)
    pixels = raw_pixel_accuracy(cfg.data.train, size)
    print(f"linear probe on frozen features (logistic regression, validation split of {cfg.data.train}):\n"
          f"  {cfg.objective.name} pre-trained  {trained:.1%}\n  random init      {initial:.1%}\n"
          f"  raw pixels       {pixels:.1%} (the same logistic regression on the {size}x{size} images, no backbone)")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return reported(_main, parse_args(argv), failures=(NonFiniteLossError, CheckpointError))


def _main(args: argparse.Namespace) -> int:
    """What the command line asks for: the demo, the resolved config, or training; the exit code."""
    distributed = "WORLD_SIZE" in os.environ
    if not args.config and not args.overrides and not args.print_config and not distributed:
        return run_demo()
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    if not distributed:
        from pretrain.data.builtin import prepare_data

        prepare_data(cfg.data)
        preflight(cfg, 1)
    return STOPPED_EXIT_CODE if train(cfg) == "stopped" else 0


if __name__ == "__main__":
    exit_without_teardown(main())
