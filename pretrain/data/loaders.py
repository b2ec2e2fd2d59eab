"""The run's data loaders, from its config, its shards, the objective's view and the processes."""

from __future__ import annotations

from typing import Callable

from pretrain.config import Config
from pretrain.data.device_decode import DeviceDecodedView
from pretrain.data.readers.parquet import Columns
from pretrain.data.shards import ShardSet
from pretrain.data.stream import Loader, ShardDataset, SyntheticDataset
from pretrain.dist import DistEnv


def build_train_loader(cfg: Config, source: ShardSet | None, view: Callable, dist: DistEnv,
                       num_classes: int) -> Loader:
    """The endless training stream of this rank: ``source``'s shards (in whatever format they are)
    through ``view``, or the same synthetic batch forever with ``data.synthetic``."""
    d = cfg.data
    if d.synthetic:
        dataset = SyntheticDataset(view, d.batch_size, d.image_size, num_classes, cfg.run.seed)
    else:
        if d.decode_on_device:
            view = DeviceDecodedView(view)
        dataset = ShardDataset(source.urls, view, d.batch_size, rank=dist.rank, world_size=dist.world_size,
                               seed=cfg.run.seed, train=True, shuffle_buffer=d.shuffle_buffer, counts=source.counts,
                               resampled=d.resampled, shard_timeout=d.shard_timeout,
                               columns=Columns(d.image_column, d.label_column), labelled=cfg.objective.uses_labels)
    return Loader(dataset, d.workers, pin_memory=d.pin_memory and dist.device.type == "cuda",
                  max_skip_rate=d.max_skip_rate)


def build_val_loader(cfg: Config, source: ShardSet | None, view: Callable | None, dist: DistEnv) -> Loader | None:
    """This rank's share of the validation set, each sample once; None without a val set or an
    evaluation view."""
    if source is None or view is None:
        return None
    d = cfg.data
    dataset = ShardDataset(source.urls, view, d.val_batch_size or d.batch_size, rank=dist.rank,
                           world_size=dist.world_size, seed=cfg.run.seed, train=False, counts=source.counts,
                           shard_timeout=d.shard_timeout, columns=Columns(d.image_column, d.label_column))
    return Loader(dataset, d.workers, pin_memory=d.pin_memory and dist.device.type == "cuda")
