"""The run's plan: where its shards are, and the batch, lr and step arithmetic that follows from
them and the number of processes. Computed before any process starts (``preflight``) and again by
each rank; nothing here touches a model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pretrain.config import Config, ConfigError
from pretrain.data import shards, sources
from pretrain.data.readers.parquet import Columns
from pretrain.schedules import scaled_lr
from pretrain.state.layout import CHECKPOINTS_DIR, latest_meta


@dataclass(frozen=True)
class Plan:
    """The run's derived numbers, written to ``run.json``."""

    world_size: int
    global_batch: int
    peak_lr: float
    min_lr: float  # the cosine's floor at this global batch (optim.scale_min_lr)
    total_steps: int
    steps_per_epoch: int
    warmup_steps: int
    num_classes: int
    train_samples: int | None


def make_plan(cfg: Config, world_size: int, train: shards.ShardSet | None) -> Plan:
    """Batch, lr and step arithmetic; raises ConfigError when the config leaves it undetermined."""
    global_batch = cfg.data.batch_size * world_size * cfg.train.grad_accum
    samples = cfg.data.train_samples or (train.samples if train else None)
    steps_per_epoch = samples // global_batch if samples else 0
    if samples is not None and steps_per_epoch == 0:
        given = f"data.global_batch={cfg.data.global_batch}, so " if cfg.data.global_batch else ""
        raise ConfigError(f"{given}data.batch_size={cfg.data.batch_size}: the global batch of {global_batch} "
                          f"(x train.grad_accum={cfg.train.grad_accum} x {world_size} processes) is larger than "
                          f"the {samples} training samples")
    if cfg.train.epochs is not None:
        if not steps_per_epoch:
            raise ConfigError("train.epochs needs the number of training samples: use shards with an index "
                              "or set data.train_samples (or use train.steps)")
        total = max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    else:
        total = cfg.train.steps
    warmup = cfg.optim.warmup_steps
    if cfg.optim.warmup_epochs:
        if not steps_per_epoch:
            raise ConfigError("optim.warmup_epochs needs the number of training samples; use optim.warmup_steps")
        warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
    num_classes = cfg.data.num_classes or (len(train.classes) if train and train.classes else None)
    if num_classes is None:
        raise ConfigError("data.num_classes is required when the shards have no index naming the classes")
    o = cfg.optim
    lr = o.lr or scaled_lr(o.base_lr, o.base_batch, global_batch, o.lr_scaling)
    min_lr = scaled_lr(o.min_lr, o.base_batch, global_batch, o.lr_scaling) if o.scale_min_lr else o.min_lr
    return Plan(world_size, global_batch, lr, min_lr, total, steps_per_epoch or total, min(warmup, total),
                num_classes, samples)


def check_resume(cfg: Config, world_size: int, train: shards.ShardSet | None) -> None:
    """ConfigError, before any process starts, when run.dir's latest checkpoint cannot be taken up by
    ``world_size`` processes: another number of readers needs per-shard sample counts to finish the
    interrupted epoch exactly."""
    directory = Path(cfg.run.dir) / CHECKPOINTS_DIR
    latest = latest_meta(directory)
    if latest is None:
        return  # a fresh run, or a fault the resume itself reports
    tag, saved = latest
    before = (saved.get("world_size"), saved.get("data_workers"))
    if not cfg.train.resume or before[0] is None or before == (world_size, cfg.data.workers):
        return
    if train is not None and train.counts is None and not cfg.data.resampled and not cfg.data.synthetic:
        raise ConfigError(f"{directory / tag} was written by {before[0]} processes x {before[1]} data workers; "
                          f"resuming it on {world_size} x {cfg.data.workers} needs per-shard sample counts "
                          f"(shards written by pretrain.data.write, with index.json) to finish the interrupted "
                          f"epoch exactly: resume on {before[0]} processes with data.workers={before[1]}")


def resolve_sources(cfg: Config) -> tuple[shards.ShardSet | None, shards.ShardSet | None]:
    """The train and val shards; ShardError listing every missing local shard."""
    found = []
    for source, split in ((cfg.data.train, "train"), (cfg.data.val, "val")):
        if source is None or (cfg.data.synthetic and split == "train"):
            found.append(None)
            continue
        shard_set = sources.resolve(source, split, Columns(cfg.data.image_column, cfg.data.label_column),
                                   cfg.data.shard_timeout)
        missing = shards.missing_shards(shard_set.urls)
        if missing:
            listed = "\n  ".join(missing[:20]) + (f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else "")
            raise shards.ShardError(f"data.{split}: {len(missing)} of {len(shard_set.urls)} shards are missing "
                                    f"or unreadable:\n  {listed}")
        found.append(shard_set)
    train = found[0]
    # Pre-training's supervised objective and every later stage (a probe, a fine-tuning) train on classes.
    objective = getattr(cfg, "objective", None)
    if train is not None and (objective is None or objective.uses_labels) and train.labels != "class":
        what = ("holds lists of classes (multi-label)" if train.labels == "multi" else
                "has no label column (looked for label, labels, cls, fine_label, ...)")
        needs = f"objective.name={objective.name!r}" if objective is not None else "this stage"
        raise ConfigError(f"data.train={cfg.data.train!r}: its Parquet label column {what}; {needs} needs one "
                          f"class per image: name such a column with data.label_column"
                          + (", or train a self-supervised objective" if objective is not None else ""))
    shards.check_train_and_val(found[0], found[1], cfg.data.train, cfg.data.val)
    return found[0], found[1]
