"""One rank's batches, as its DataLoader workers make them: the stream's stages composed.

split (:mod:`~pretrain.data.split`: which pieces of which shards a worker reads in an epoch) ->
read (:mod:`~pretrain.data.read`: their raw samples, through each shard format's reader) ->
shuffle (:func:`~pretrain.data.deal.buffer_shuffle`) -> decode (:mod:`~pretrain.data.decode`) ->
view (:mod:`~pretrain.data.view`) -> collate (:mod:`~pretrain.data.collate`). The skips and broken
shards met on the way are counted in a :class:`~pretrain.data.faults.Faults` and handed over with
each batch.

Every random choice is a function of (seed, epoch, rank, worker role, position), so a stream can be
resumed exactly: a worker told to start at (epoch, position) skips that many raw samples of the
epoch without decoding them.

Training streams are endless (epoch after epoch), so every rank yields as many batches as the
trainer asks for and none waits at an epoch's end; with counts, ranks also stay in step (their
epochs differ by at most one sample). Validation streams are finite and see each sample once.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from typing import Callable, Iterator

import numpy as np
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from pretrain.data.collate import WorkerBatch, collate
from pretrain.data.deal import Plan, buffer_shuffle, shuffle_rng
from pretrain.data.decode import BadSample, decode
from pretrain.data.faults import Faults
from pretrain.data.read import ShardReader
from pretrain.data.readers.parquet import Columns
from pretrain.data.shards import ShardError
from pretrain.data.split import Split
from pretrain.data.view import SeededView, sample_seed

log = logging.getLogger(__name__)


class ShardDataset(IterableDataset):
    """Batches of views from shards, for one rank; DataLoader workers split the rank's share.

    ``counts`` (samples per shard, from the index) give exact, balanced shares. ``resampled``
    draws each slot's shards with replacement, a fresh draw each epoch. ``columns`` names the image and
    label columns of Parquet shards (``data.image_column``, ``data.label_column``); without
    ``labelled``, samples without a label are used (label -1) instead of skipped. ``roles``, ``start``
    and ``plan`` (set by :class:`~pretrain.data.stream.Loader` before each iteration) say which part
    of the stream each worker plays, from which (epoch, raw sample) it starts, and how an elastic
    resume dealt the rest of the interrupted epochs.

    Iterating it yields plain batches (a single-process reader's view); the Loader reads
    :meth:`worker_batches`, which also say where each batch leaves the stream and what was skipped.
    """

    def __init__(self, urls: list[str], view: Callable, batch_size: int, *, rank: int, world_size: int,
                 seed: int, train: bool, shuffle_buffer: int = 0, counts: list[int] | None = None,
                 resampled: bool = False, shard_timeout: float | None = None, columns: Columns = Columns(),
                 labelled: bool = True) -> None:
        if counts is not None and len(counts) != len(urls):
            raise ValueError(f"{len(counts)} shard counts for {len(urls)} shards")
        self.urls = list(urls)
        self.counts = list(counts) if counts is not None else None
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.train = train
        self.resampled = resampled and train
        self.labelled = labelled
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.split = Split(tuple(self.urls), tuple(self.counts) if counts is not None else None, seed, rank,
                           world_size, shuffled=train, resampled=self.resampled)
        self.reader = ShardReader(dict(zip(self.urls, self.counts)) if counts is not None else {}, shard_timeout,
                                  columns)
        self.view = SeededView(view)
        self.roles: list[int] = [0]
        self.start: dict[int, tuple[int, int]] = {}
        self.plan: Plan | None = None  # set by an elastic resume: the rest of the interrupted epochs
        self.faults = Faults()  # since the last batch

    @property
    def counters(self) -> Counter:
        """Samples skipped since the last batch, by reason."""
        return self.faults.skipped

    @property
    def seen(self) -> int:
        """Raw samples decoded or tried since the last batch."""
        return self.faults.seen

    def epoch_order(self, epoch: int) -> list[int]:
        """Shard indices in this epoch's order: a permutation of (seed, epoch), the same on every rank."""
        return self.split.epoch_order(epoch)

    def raw_samples(self, epoch: int, role: int, workers: int) -> Iterator[dict]:
        """This role's raw samples of one epoch, in shard order (before shuffling)."""
        return self.reader.samples(self.split.share(epoch, role, workers, self.plan), self.faults)

    # -- iteration ---------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        return (worker_batch.batch for worker_batch in self.worker_batches())

    def worker_batches(self) -> Iterator[WorkerBatch]:
        """This worker's batches, each with its role, its resume position and the faults before it."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        role = self.roles[worker] if len(self.roles) == workers else worker
        epoch, skip = self.start.get(role, (0, 0))
        self.faults = Faults()
        items: list[dict] = []
        while True:
            deal = self.split.deal(epoch, self.plan)
            rng = shuffle_rng(self.seed, epoch, self.rank, role, deal)
            read = 0
            for index, raw in enumerate(buffer_shuffle(self.raw_samples(epoch, role, workers), self.shuffle_buffer,
                                                       rng)):
                read += 1
                if index < skip:
                    continue  # consumed before a resume: skipped without decoding
                item = self._prepare(raw, sample_seed(self.seed, epoch, self.rank, role, index))
                if item is None:
                    continue
                items.append(item)
                if len(items) == self.batch_size:
                    yield collate(items, role, (epoch, index + 1), self.faults.take())
                    items = []
            if self.train and read == 0 and not deal:  # an endless stream with nothing in it would spin forever
                raise ShardError(f"rank {self.rank}, data worker {role}: no samples in epoch {epoch} from its share "
                                 f"of {len(self.urls)} shards ({dict(self.faults.skipped) or 'no problems counted'}); "
                                 f"are there fewer samples than ranks x data.workers, or are the shards empty?")
            skip = 0
            epoch += 1
            if not self.train:
                break
        if items:
            yield collate(items, role, (epoch, 0), self.faults.take())

    def _prepare(self, raw: dict, seed: int) -> dict | None:
        """The views, label and key of one raw sample (decode, then view); None (counted) if unusable."""
        self.faults.seen += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL's "palette with transparency" and EXIF chatter
                image, label = decode(raw, lazy=self.view.decodes_itself, labelled=self.labelled)
                views = self.view(image, raw["__key__"], seed)
        except BadSample as e:
            self.faults.sample_skipped(e.reason)
            log.debug("skipping %s", e)
            return None
        return {**views, "label": label, "__key__": raw["__key__"]}


class SyntheticDataset(IterableDataset):
    """The same batch of views of random images, forever: a data path that costs nothing."""

    def __init__(self, view: Callable, batch_size: int, image_size: int, num_classes: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        items = []
        for i in range(batch_size):
            pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
            items.append({**view(Image.fromarray(pixels)), "label": int(rng.integers(num_classes))})
        self.batch = default_collate(items)

    def __iter__(self) -> Iterator[dict]:
        return (worker_batch.batch for worker_batch in self.worker_batches())

    def worker_batches(self) -> Iterator[WorkerBatch]:
        info = get_worker_info()
        role = info.id if info else 0
        while True:
            yield WorkerBatch(dict(self.batch), role, (0, 0), Faults(seen=len(self.batch["label"])))
