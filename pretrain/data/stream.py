"""The sample stream: shards -> split by rank and worker -> shuffle -> decode -> views -> batches.

The same for every shard format: a shard's raw samples come from its format's reader
(:mod:`pretrain.data.readers`), by position, and everything here works on those positions.

Every random choice is a function of (seed, epoch, rank, worker role, position), so a stream can be
resumed exactly: the loader records, per worker role, how far into which epoch the trainer has
consumed, and a resumed worker skips that many raw samples without decoding them.

How an epoch is split over the ``ranks x workers`` readers ("slots"):
- with per-shard sample counts (a writer's index), the epoch's shards are laid end to end and each
  slot reads one contiguous run of samples: shares differ by at most one sample, and a slot opens at
  most two shards that it shares with a neighbour (reading, not decoding, the part it skips);
- without counts, whole shards go round-robin to the slots; with fewer shards than slots, every slot
  reads every shard and keeps every ``slots``-th sample.

A run resumed on another number of ranks or workers continues its interrupted epoch with exactly
the samples the old readers had not handed out, dealt over the new readers, then reads ordinary
epochs (:mod:`pretrain.data.deal`).

Training streams are endless (epoch after epoch), so every rank yields as many batches as the
trainer asks for and none waits at an epoch's end; with counts, ranks also stay in step (their
epochs differ by at most one sample). Validation streams are finite and see each sample once.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from collections import Counter
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from pretrain import hooks
from pretrain.data import readers
from pretrain.data.deal import Generation, Plan, buffer_shuffle, seed_of, shuffle_rng
from pretrain.data.readers.parquet import Columns
from pretrain.data.shards import SHARD_REASONS, BrokenShard, ShardError
from pretrain.data.decode import DECODE_ERRORS, BadSample, decode
from pretrain.data.device_decode import collate
from pretrain.data.workers import end_workers_at_exit, end_workers_now, shield_worker

log = logging.getLogger(__name__)

MAX_BROKEN_NAMED = 5  # broken shards a skip-rate error names


class SkipRateError(ShardError):
    """Too many samples were skipped: the data is broken, and training on the rest would mislead."""


_seed = seed_of


@dataclass(frozen=True)
class Piece:
    """Samples ``[start, stop)`` (in shard order) of one shard; ``stop=None``: to its end; with
    ``keep``, only those sample numbers of the range."""

    url: str
    start: int = 0
    stop: int | None = None
    keep: frozenset | None = None


def contiguous_share(urls: list[str], counts: list[int], slots: int, slot: int) -> list[Piece]:
    """Slot ``slot``'s run of samples when the shards, in this order, are laid end to end."""
    total = sum(counts)
    begin, end = slot * total // slots, (slot + 1) * total // slots
    pieces, offset = [], 0
    for url, count in zip(urls, counts):
        lo, hi = max(begin, offset), min(end, offset + count)
        if lo < hi:
            pieces.append(Piece(url, lo - offset, hi - offset))
        offset += count
    return pieces


def pieces_at(urls: list[str], counts: list[int], positions: np.ndarray) -> list[Piece]:
    """The samples at sorted ``positions`` of the shards (in this order) laid end to end."""
    ends = np.cumsum(counts)
    shard_of = np.searchsorted(ends, positions, side="right")
    pieces = []
    for shard in np.unique(shard_of):
        local = positions[shard_of == shard] - (ends[shard] - counts[shard])
        lo, hi = int(local[0]), int(local[-1]) + 1
        pieces.append(Piece(urls[shard], lo, hi, None if hi - lo == len(local) else frozenset(local.tolist())))
    return pieces


class ShardDataset(IterableDataset):
    """Batches of views from shards, for one rank; DataLoader workers split the rank's share.

    ``counts`` (samples per shard, from the index) give exact, balanced shares. ``resampled``
    draws each slot's shards with replacement, a fresh draw each epoch. ``columns`` names the image and
    label columns of Parquet shards (``data.image_column``, ``data.label_column``); without
    ``labelled``, samples without a label are used (label -1) instead of skipped. ``roles`` and ``start``
    (set by :class:`Loader` before each iteration) say which part of the stream each worker plays
    and from which (epoch, raw sample) it starts.
    """

    def __init__(self, urls: list[str], view: Callable, batch_size: int, *, rank: int, world_size: int,
                 seed: int, train: bool, shuffle_buffer: int = 0, counts: list[int] | None = None,
                 resampled: bool = False, shard_timeout: float | None = None, columns: Columns = Columns(),
                 labelled: bool = True) -> None:
        if counts is not None and len(counts) != len(urls):
            raise ValueError(f"{len(counts)} shard counts for {len(urls)} shards")
        self.urls = list(urls)
        self.counts = list(counts) if counts is not None else None
        self.count_of = dict(zip(self.urls, self.counts)) if counts is not None else {}
        self.view = view
        self.lazy_decode = bool(getattr(view, "decodes_itself", False))
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.train = train
        self.resampled = resampled and train
        self.shard_timeout = shard_timeout
        self.columns = columns
        self.labelled = labelled
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.roles: list[int] = [0]
        self.start: dict[int, tuple[int, int]] = {}
        self.plan: Plan | None = None  # set by an elastic resume: the rest of the interrupted epochs
        self.counters: Counter = Counter()  # skipped samples by reason, since the last batch
        self.broken: list[str] = []  # shards that broke, since the last batch
        self.seen = 0  # raw samples prepared since the last batch

    # -- which raw samples a (rank, role) reads ---------------------------------------------------

    def epoch_order(self, epoch: int) -> list[int]:
        """Shard indices in this epoch's order: a permutation of (seed, epoch), the same on every rank."""
        if not self.train:
            return list(range(len(self.urls)))
        return np.random.default_rng(_seed(self.seed, epoch)).permutation(len(self.urls)).tolist()

    def raw_samples(self, epoch: int, role: int, workers: int) -> Iterator[dict]:
        """This role's raw samples of one epoch, in shard order (before shuffling)."""
        slots, slot = self.world_size * workers, self.rank * workers + role
        if self.resampled:
            rng = np.random.default_rng(_seed(self.seed, epoch, self.rank, role, 1))
            draws = rng.integers(len(self.urls), size=max(1, round(len(self.urls) / slots)))
            yield from self._read([Piece(self.urls[i]) for i in draws], self.counters)
            return
        order = self.epoch_order(epoch)
        urls = [self.urls[i] for i in order]
        if self.counts is not None:
            counts = [self.counts[i] for i in order]
            if self.deal(epoch):
                yield from self._read(pieces_at(urls, counts, self.plan.positions(epoch, slot)), self.counters)
                return
            yield from self._read(contiguous_share(urls, counts, slots, slot), self.counters)
        elif len(urls) >= slots:  # whole shards per slot: each worker reads only its own
            yield from self._read([Piece(u) for u in urls[slot::slots]], self.counters)
        else:  # fewer shards than slots: everyone reads everything and keeps every slots-th sample
            shared = self._read([Piece(u) for u in urls], self.counters if slot == 0 else Counter())
            for i, sample in enumerate(shared):
                if i % slots == slot:
                    yield sample

    def _read(self, pieces: list[Piece], counters: Counter) -> Iterator[dict]:
        """Samples of ``pieces``, each read by its shard's format; a broken, vanished or stalled shard
        is counted, logged, and left for the next one (the samples read before the problem are kept).
        It is counted as the samples of the piece it took away when the index gives the shard's
        count, else as one."""
        for piece in pieces:
            read = piece.start  # the position after the last sample read
            reason = None
            try:
                samples = readers.reader_for(piece.url).samples(piece.url, piece.start, self.shard_timeout,
                                                               self.columns)
                with closing(samples):
                    for position, sample in enumerate(samples, piece.start):
                        read = position + 1
                        if piece.keep is None or position in piece.keep:
                            yield sample
                        if piece.stop is not None and read >= piece.stop:
                            break
            except BrokenShard as e:
                reason = e.reason
                log.warning("skipping the rest of shard %s: %s (%s; %d samples read)", piece.url, e, reason, read)
            expected = self._expected(piece)
            if reason is None and expected is not None and read < expected:  # cut at a block boundary
                reason = "truncated_shard"
                log.warning("%s: ends after %d samples, the index says %d", piece.url, read, expected)
            if reason is not None:
                counters[reason] += self._lost(piece, read)
                if counters is self.counters:
                    self.broken.append(piece.url)

    def _expected(self, piece: Piece) -> int | None:
        """Where ``piece`` ends in its shard, in samples, if known."""
        return piece.stop if piece.stop is not None else self.count_of.get(piece.url)

    def _lost(self, piece: Piece, read: int) -> int:
        """Samples of ``piece`` that a shard breaking after ``read`` samples took away (1 if unknown)."""
        stop = self._expected(piece)
        if stop is None:
            return 1
        return max(1, stop - max(read, piece.start))

    def shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        return buffer_shuffle(samples, self.shuffle_buffer, rng)

    def deal(self, epoch: int) -> int:
        """0 for an ordinary epoch; else the plan's generation dealing out an interrupted epoch's rest."""
        return self.plan.deal_of(epoch) if self.plan is not None and not self.resampled else 0

    # -- iteration ---------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        role = self.roles[worker] if len(self.roles) == workers else worker
        epoch, skip = self.start.get(role, (0, 0))
        self.counters = Counter()
        self.broken = []
        self.seen = 0
        batch: list[dict] = []
        while True:
            deal = self.deal(epoch)
            rng = shuffle_rng(self.seed, epoch, self.rank, role, deal)
            read = 0
            for index, raw in enumerate(self.shuffled(self.raw_samples(epoch, role, workers), rng)):
                read += 1
                if index < skip:
                    continue  # consumed before a resume: skipped without decoding
                item = self._prepare(raw, _seed(self.seed, epoch, self.rank, role, index))
                if item is None:
                    continue
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield self._collate(batch, role, (epoch, index + 1))
                    batch = []
            if self.train and read == 0 and not deal:  # an endless stream with nothing in it would spin forever
                raise ShardError(f"rank {self.rank}, data worker {role}: no samples in epoch {epoch} from its share "
                                 f"of {len(self.urls)} shards ({dict(self.counters) or 'no problems counted'}); "
                                 f"are there fewer samples than ranks x data.workers, or are the shards empty?")
            skip = 0
            epoch += 1
            if not self.train:
                break
        if batch:
            yield self._collate(batch, role, (epoch, 0))

    def _prepare(self, raw: dict, seed: int) -> dict | None:
        # Augmentations draw from the global RNGs; seeding them per sample makes a resumed stream
        # produce the same crops as an uninterrupted one.
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it queues work for every accelerator
        self.seen += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL's "palette with transparency" and EXIF chatter
                image, label = decode(raw, lazy=self.lazy_decode, labelled=self.labelled)
                try:
                    views = self.view(image)
                except DECODE_ERRORS as e:  # a lazily decoded image fails inside the view
                    raise BadSample("undecodable", f"{raw['__key__']}: {e}") from None
        except BadSample as e:
            self.counters[e.reason] += 1
            log.debug("skipping %s", e)
            return None
        return {**views, "label": label, "__key__": raw["__key__"]}

    def _collate(self, items: list[dict], role: int, position: tuple[int, int]) -> dict:
        keys = [item.pop("__key__") for item in items]
        batch = collate(items, keys)  # default_collate, leaving JPEGs for the device to decode
        batch.update(__keys__=keys, __role__=role, __position__=position,
                     __skipped__=dict(self.counters), __broken__=list(self.broken), __seen__=self.seen)
        self.counters.clear()
        self.broken.clear()
        self.seen = 0
        return batch


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
        info = get_worker_info()
        role = info.id if info else 0
        while True:
            yield {**self.batch, "__role__": role, "__position__": (0, 0), "__skipped__": {}, "__broken__": [],
                   "__seen__": len(self.batch["label"])}


class Loader:
    """A DataLoader over a stream dataset that remembers what the trainer consumed.

    ``state_dict()`` holds, per worker role, the (epoch, raw sample) after the last consumed batch;
    a loader restored from it continues with exactly the batches an uninterrupted one would yield.
    With ``max_skip_rate``, iteration stops with :class:`SkipRateError` once at least
    ``min_samples`` samples were read or lost and more than that share of them was skipped (a
    broken shard counts as the samples it took away, as far as the index knows them, else as one).
    """

    def __init__(self, dataset: IterableDataset, workers: int, pin_memory: bool = False,
                 max_skip_rate: float | None = None, min_samples: int = 100) -> None:
        self.dataset = dataset
        self.workers = workers
        self.pin_memory = pin_memory
        self.max_skip_rate = max_skip_rate
        self.min_samples = min_samples
        self.consumed = 0
        self.seen = 0
        self.positions: dict[int, tuple[int, int]] = {}
        self.skipped: Counter = Counter()
        self.plan: Plan | None = None  # after an elastic resume: who reads the rest of the interrupted epochs
        self._plan_state: dict | None = None  # self.plan.to_dict(), made once (state_dict runs every batch)
        self.broken: list[str] = []  # the shards that broke, newest last (a few, for the message)

    def __iter__(self) -> Iterator[dict]:
        roles = max(self.workers, 1)
        # The DataLoader serves its workers round-robin from worker 0; rotate roles so that the
        # next batch comes from the role an uninterrupted run would have used.
        self.dataset.roles = [(w + self.consumed) % roles for w in range(roles)]
        first = self.plan.start_epoch() if self.plan is not None else 0
        self.dataset.start = {role: self.positions.get(role, (first, 0)) for role in range(roles)}
        self.dataset.plan = self.plan
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.workers,
                            pin_memory=self.pin_memory, persistent_workers=False,
                            worker_init_fn=partial(shield_worker, rank_pid=os.getpid()) if self.workers else None)
        batches = iter(loader)
        end_workers_at_exit(batches)
        try:
            for batch in batches:
                self.positions[batch.pop("__role__")] = tuple(batch.pop("__position__"))
                self.skipped.update(batch.pop("__skipped__"))
                self.broken = (self.broken + batch.pop("__broken__"))[-MAX_BROKEN_NAMED:]
                self.seen += batch.pop("__seen__")
                self.consumed += 1
                hooks.fire("batch", rank=getattr(self.dataset, "rank", 0), keys=batch.get("__keys__", ()))
                self._check_skip_rate()
                yield batch
        except Exception:
            end_workers_now(batches)  # they ignore SIGTERM: torch's shutdown of a failed loader leaves them
            raise

    def _check_skip_rate(self) -> None:
        # Samples a broken shard took away were never read: they count on both sides of the rate.
        total = self.seen + sum(v for k, v in self.skipped.items() if k in SHARD_REASONS)
        if self.max_skip_rate is None or total < self.min_samples:
            return
        skipped = sum(self.skipped.values())
        if skipped > self.max_skip_rate * total:
            reasons = ", ".join(f"{k} {v}" for k, v in self.skipped.most_common())
            broken = f"; broken shards: {', '.join(self.broken)}" if self.broken else ""
            raise SkipRateError(f"{skipped} of {total} samples on this rank were skipped or lost with their shard "
                                f"({reasons}){broken}: more than data.max_skip_rate={self.max_skip_rate}. Find the "
                                f"broken shards with `python -m pretrain.data.check`, or raise data.max_skip_rate")

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "workers": self.workers, "seen": self.seen,
                "positions": {int(k): list(v) for k, v in self.positions.items()},
                "skipped": dict(self.skipped), "buffer": getattr(self.dataset, "shuffle_buffer", 0),
                "plan": self._plan_state}

    def load_state_dict(self, state: dict) -> None:
        if state["workers"] != self.workers:
            raise ValueError(f"data.workers={self.workers} but the checkpoint was written with "
                             f"{state['workers']} workers per rank; the stream cannot resume exactly")
        self.consumed = state["consumed"]
        self.seen = state.get("seen", 0)
        self.positions = {int(k): tuple(v) for k, v in state["positions"].items()}
        self.skipped = Counter(state.get("skipped", {}))
        self._set_plan(Plan.from_dict(state["plan"]) if state.get("plan") else None)

    def _set_plan(self, plan: Plan | None) -> None:
        self.plan, self._plan_state = plan, plan.to_dict() if plan is not None else None

    def resume_elsewhere(self, states: list[dict]) -> None:
        """Continue a stream that ``len(states)`` ranks (their :meth:`state_dict`, in rank order) read
        with another number of ranks or workers: the rest of the epochs they were in is dealt over
        this run's readers, each sample once (:class:`~pretrain.data.deal.Plan`); then ordinary epochs.

        ValueError when that cannot be worked out: shards without per-shard counts.
        """
        dataset = self.dataset
        old_roles = max(states[0]["workers"], 1)
        old_plan = Plan.from_dict(states[0]["plan"]) if states[0].get("plan") else None
        first = old_plan.start_epoch() if old_plan is not None else 0
        stopped = np.array([[*state["positions"].get(role, state["positions"].get(str(role), (first, 0)))]
                            for state in states for role in range(old_roles)], dtype=np.int64).reshape(-1, 2)
        roles = max(self.workers, 1)
        if not isinstance(dataset, ShardDataset) or dataset.resampled:
            # synthetic batches, or shards drawn with replacement: no epoch to finish; go on from the newest
            self._set_plan(None)
            start = int(stopped[:, 0].max())
        else:
            if dataset.counts is None:
                raise ValueError(f"the shards have no per-shard sample counts (an index.json written by "
                                 f"pretrain.data.write), so the rest of the interrupted epoch cannot be dealt "
                                 f"exactly over {dataset.world_size} ranks x {roles} workers; resume it on "
                                 f"{len(states)} ranks x {old_roles} workers")
            if old_plan is None:
                old_plan = Plan(sum(dataset.counts), dataset.seed,
                                [Generation(len(states), old_roles, states[0].get("buffer", dataset.shuffle_buffer))])
            self._set_plan(old_plan.resumed(stopped, dataset.world_size, roles, dataset.shuffle_buffer))
            start = self.plan.start_epoch()
        self.positions = {role: (start, 0) for role in range(roles)}
        self.consumed = 0
        # Counters are per rank: rank 0 carries the old ranks' totals, so that the run's sums stay right.
        main = getattr(dataset, "rank", 0) == 0
        self.seen = sum(state.get("seen", 0) for state in states) if main else 0
        self.skipped = sum((Counter(state.get("skipped", {})) for state in states), Counter()) if main else Counter()
