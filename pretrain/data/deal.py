"""Which samples of an epoch each reader takes, and what is left of an epoch when a run stops.

Pure arithmetic over sample positions (numpy, no data read): position ``i`` of epoch ``t`` is the
``i``-th sample when that epoch's shards (a permutation of (seed, epoch), the same for any number of
processes) are laid end to end. A reader ("slot") is one DataLoader worker of one rank: slot
``rank * workers + worker``.

- An ordinary epoch on ``S`` slots gives slot ``s`` the run ``[s*T//S, (s+1)*T//S)``.
- A slot reads its positions in order through a shuffle buffer (:func:`buffer_shuffle`, seeded per
  (seed, epoch, rank, worker)); its resume position ``(epoch, p)`` says it handed out the first
  ``p`` samples of that stream. Replaying the buffer over positions instead of samples
  (:func:`consumed`) tells which ``p`` positions those were.
- An elastic resume (another number of slots) appends a :class:`Generation`: the positions of the
  previous slots when they stopped. For each epoch in which some old slot was still reading
  (``first..last``), every position no old slot had handed out goes, once, to the new slots: the
  remainders of the old slots are laid end to end (old slot by old slot, each in position order)
  and the new slot ``j`` takes the ``j``-th contiguous run of them. Later epochs are the ordinary
  epochs of the new slots. A new slot needs only the few old slots its run overlaps, so each rank
  works out its own share without looking at every old slot's buffer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np


def seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def buffer_shuffle(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """A streaming shuffle: a buffer of ``size`` items, a random one out for each new one in."""
    if size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(len(buffer))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def shuffle_rng(seed: int, epoch: int, rank: int, worker: int, deal: int) -> random.Random:
    """The shuffle buffer's generator of one reader in one epoch; ``deal`` 0 for an ordinary epoch,
    the generation's number for the remainder of an interrupted one (other draws than the epoch's)."""
    parts = (seed, epoch, rank, worker) if deal == 0 else (seed, epoch, rank, worker, (1 << 31) + deal)
    return random.Random(seed_of(*parts))


def consumed(n: int, handed_out: int, buffer: int, rng: random.Random) -> np.ndarray:
    """Indices (into a reader's ``n`` positions) of the first ``handed_out`` it handed out: the draws of
    :func:`buffer_shuffle` over ``range(n)``, without its per-item generator overhead."""
    if handed_out >= n:
        return np.arange(n)
    if buffer <= 1:
        return np.arange(handed_out)
    held = list(range(min(buffer, n)))  # filling the buffer draws nothing
    out = []
    for item in range(len(held), n):
        if len(out) == handed_out:
            break
        i = rng.randrange(len(held))
        out.append(held[i])
        held[i] = item
    if len(out) < handed_out:
        rng.shuffle(held)
        out += held[:handed_out - len(out)]
    return np.asarray(out, dtype=np.int64)


@dataclass(frozen=True)
class Generation:
    """A layout of readers: ``ranks x workers`` slots, each shuffling through ``buffer`` samples.

    ``stopped`` (elastic resumes only): the previous generation's slots' positions when it stopped,
    shape (previous slots, 2): (epoch, samples handed out in that epoch).
    """

    ranks: int
    workers: int
    buffer: int
    stopped: np.ndarray | None = None

    @property
    def slots(self) -> int:
        return self.ranks * self.workers

    @property
    def epochs(self) -> tuple[int, int] | None:
        """The interrupted epochs this generation finishes (first, last), or None."""
        if self.stopped is None:
            return None
        return int(self.stopped[:, 0].min()), int(self.stopped[:, 0].max())

    def to_dict(self) -> dict:
        return {"ranks": self.ranks, "workers": self.workers, "buffer": self.buffer,
                "stopped": None if self.stopped is None else self.stopped.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Generation":
        stopped = None if d["stopped"] is None else np.asarray(d["stopped"], dtype=np.int64).reshape(-1, 2)
        return cls(d["ranks"], d["workers"], d["buffer"], stopped)


class Plan:
    """Every epoch's deal of ``total`` sample positions over the readers of the last generation."""

    def __init__(self, total: int, seed: int, generations: list[Generation]) -> None:
        self.total, self.seed = total, seed
        self.generations = list(generations)
        self._remaining: dict[tuple[int, int], np.ndarray] = {}
        self._recent: dict[tuple[int, int, int], np.ndarray] = {}  # unconsumed(): neighbouring new slots share old ones

    @property
    def current(self) -> Generation:
        return self.generations[-1]

    def start_epoch(self) -> int:
        """Where a reader of the current generation starts."""
        epochs = self.current.epochs
        return epochs[0] if epochs else 0

    def resumed(self, stopped: np.ndarray, ranks: int, workers: int, buffer: int) -> "Plan":
        """The plan after the current generation stopped at ``stopped`` and ``ranks x workers`` go on.

        Generations whose interrupted epochs are all behind ``stopped`` are dropped: from there on
        they read ordinary epochs, which need no history."""
        stopped = np.asarray(stopped, dtype=np.int64).reshape(-1, 2)
        if len(stopped) != self.current.slots:
            raise ValueError(f"{len(stopped)} reader positions for {self.current.slots} readers")
        kept = self.generations
        epochs = self.current.epochs
        if epochs is None or stopped[:, 0].min() > epochs[1]:
            kept = [Generation(self.current.ranks, self.current.workers, self.current.buffer)]
        return Plan(self.total, self.seed, [*kept, Generation(ranks, workers, buffer, stopped)])

    # -- sizes (all slots at once, vectorized) --------------------------------------------------------
    def sizes(self, epoch: int, level: int | None = None) -> np.ndarray:
        """How many positions of ``epoch`` each slot of generation ``level`` (default: the current) reads."""
        level = len(self.generations) - 1 if level is None else level
        gen = self.generations[level]
        total = self.remaining(epoch, level).sum() if self._dealt(epoch, level) else self.total
        bounds = np.arange(gen.slots + 1, dtype=np.int64) * int(total) // gen.slots
        return np.diff(bounds)

    def remaining(self, epoch: int, level: int) -> np.ndarray:
        """Per slot of generation ``level - 1``: how many of its positions of ``epoch`` it had not handed out."""
        if (epoch, level) in self._remaining:
            return self._remaining[epoch, level]
        before = self.sizes(epoch, level - 1)
        at = self.generations[level].stopped
        done = np.where(at[:, 0] > epoch, before, np.where(at[:, 0] == epoch, np.minimum(at[:, 1], before), 0))
        self._remaining[epoch, level] = before - done
        return before - done

    def _dealt(self, epoch: int, level: int) -> bool:
        epochs = self.generations[level].epochs
        return epochs is not None and epochs[0] <= epoch <= epochs[1]

    # -- one slot's positions -----------------------------------------------------------------------
    def positions(self, epoch: int, slot: int, level: int | None = None) -> np.ndarray:
        """The sorted positions of ``epoch`` that ``slot`` of generation ``level`` reads."""
        level = len(self.generations) - 1 if level is None else level
        gen = self.generations[level]
        if not self._dealt(epoch, level):
            return np.arange(slot * self.total // gen.slots, (slot + 1) * self.total // gen.slots, dtype=np.int64)
        left = self.remaining(epoch, level)
        ends = np.cumsum(left)
        total = int(ends[-1]) if len(ends) else 0
        lo, hi = slot * total // gen.slots, (slot + 1) * total // gen.slots
        parts = []
        first = int(np.searchsorted(ends, lo, side="right"))
        for old in range(first, len(left)):
            begin = int(ends[old] - left[old])
            if begin >= hi:
                break
            rest = self.unconsumed(epoch, old, level - 1)
            parts.append(rest[max(lo - begin, 0):hi - begin])
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def unconsumed(self, epoch: int, slot: int, level: int) -> np.ndarray:
        """The positions of ``epoch`` that ``slot`` of generation ``level`` had not handed out when the
        next generation took over."""
        key = (epoch, slot, level)
        if key not in self._recent:
            if len(self._recent) >= 8:
                del self._recent[next(iter(self._recent))]
            self._recent[key] = self._unconsumed(epoch, slot, level)
        return self._recent[key]

    def _unconsumed(self, epoch: int, slot: int, level: int) -> np.ndarray:
        mine = self.positions(epoch, slot, level)
        stop_epoch, handed = self.generations[level + 1].stopped[slot]
        if stop_epoch > epoch:
            return mine[:0]
        if stop_epoch < epoch or handed == 0:
            return mine
        gen = self.generations[level]
        rng = shuffle_rng(self.seed, epoch, slot // gen.workers, slot % gen.workers,
                          level if self._dealt(epoch, level) else 0)
        keep = np.ones(len(mine), dtype=bool)
        keep[consumed(len(mine), int(handed), gen.buffer, rng)] = False
        return mine[keep]

    def deal_of(self, epoch: int) -> int:
        """The shuffle seed's ``deal`` for the current generation's readers in ``epoch``."""
        level = len(self.generations) - 1
        return level if self._dealt(epoch, level) else 0

    # -- state ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"total": self.total, "seed": self.seed, "generations": [g.to_dict() for g in self.generations]}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(d["total"], d["seed"], [Generation.from_dict(g) for g in d["generations"]])
