"""The split stage: which pieces of which shards each reader ("slot") reads in an epoch.

Pure functions of the shard list, the per-shard counts, the seed and the epoch; nothing is read. A
slot is one DataLoader worker of one rank: slot ``rank * workers + worker`` of ``ranks x workers``.

- Each epoch has its own shard order, a permutation of (seed, epoch), the same on every rank.
- With per-shard sample counts (a writer's index), the epoch's shards are laid end to end and each
  slot reads one contiguous run of samples: shares differ by at most one sample, and a slot opens at
  most two shards that it shares with a neighbour (reading, not decoding, the part it skips).
- Without counts, whole shards go round-robin to the slots; with fewer shards than slots, every slot
  reads every shard and keeps every ``slots``-th sample.
- Resampled shards are drawn with replacement, a fresh draw per (epoch, rank, worker).
- After an elastic resume, the rest of an interrupted epoch is dealt by a
  :class:`~pretrain.data.deal.Plan`, as sample positions (:func:`pieces_at`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pretrain.data.deal import Plan, seed_of


@dataclass(frozen=True)
class Piece:
    """Samples ``[start, stop)`` (in shard order) of one shard; ``stop=None``: to its end; with
    ``keep``, only those sample numbers of the range."""

    url: str
    start: int = 0
    stop: int | None = None
    keep: frozenset | None = None


@dataclass(frozen=True)
class Share:
    """What one slot reads in one epoch: ``pieces`` in order, keeping every ``stride``-th sample
    from sample ``offset`` of them (a stride above 1: every slot reads the same shards)."""

    pieces: tuple[Piece, ...]
    stride: int = 1
    offset: int = 0


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


def round_robin(urls: list[str], slots: int, slot: int) -> Share:
    """Whole shards per slot; with fewer shards than slots, every ``slots``-th sample of all of them."""
    if len(urls) >= slots:
        return Share(tuple(Piece(u) for u in urls[slot::slots]))
    return Share(tuple(Piece(u) for u in urls), stride=slots, offset=slot)


@dataclass(frozen=True)
class Split:
    """How one rank's shards are split over epochs and over the slots of ``world_size`` ranks.

    ``shuffled``: a new shard order each epoch (training), else the listed order. ``resampled``:
    each slot draws its shards with replacement, a fresh draw each epoch.
    """

    urls: tuple[str, ...]
    counts: tuple[int, ...] | None
    seed: int
    rank: int
    world_size: int
    shuffled: bool
    resampled: bool = False

    def epoch_order(self, epoch: int) -> list[int]:
        """Shard indices in this epoch's order: a permutation of (seed, epoch), the same on every rank."""
        if not self.shuffled:
            return list(range(len(self.urls)))
        return np.random.default_rng(seed_of(self.seed, epoch)).permutation(len(self.urls)).tolist()

    def deal(self, epoch: int, plan: Plan | None) -> int:
        """0 for an ordinary epoch; else ``plan``'s generation dealing out an interrupted epoch's rest."""
        return plan.deal_of(epoch) if plan is not None and not self.resampled else 0

    def share(self, epoch: int, role: int, workers: int, plan: Plan | None = None) -> Share:
        """What worker ``role`` of ``workers`` on this rank reads in ``epoch`` (before shuffling)."""
        slots, slot = self.world_size * workers, self.rank * workers + role
        if self.resampled:
            rng = np.random.default_rng(seed_of(self.seed, epoch, self.rank, role, 1))
            draws = rng.integers(len(self.urls), size=max(1, round(len(self.urls) / slots)))
            return Share(tuple(Piece(self.urls[i]) for i in draws))
        order = self.epoch_order(epoch)
        urls = [self.urls[i] for i in order]
        if self.counts is None:
            return round_robin(urls, slots, slot)
        counts = [self.counts[i] for i in order]
        if self.deal(epoch, plan):
            return Share(tuple(pieces_at(urls, counts, plan.positions(epoch, slot))))
        return Share(tuple(contiguous_share(urls, counts, slots, slot)))
