"""Fault accounting: what a stream skipped or lost, and when that is too much to train on.

A worker counts into a :class:`Faults` while it reads and decodes, and hands over (and clears) the
counts with each batch; the rank's :class:`~pretrain.data.stream.Loader` adds them to its totals and
checks them with :func:`check_skip_rate`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pretrain.data.shards import SHARD_REASONS, ShardError

MAX_BROKEN_NAMED = 5  # broken shards a skip-rate error names


class SkipRateError(ShardError):
    """Too many samples were skipped: the data is broken, and training on the rest would mislead."""


@dataclass
class Faults:
    """Samples skipped by reason (a broken shard filed under its reason, as the samples it took
    away), the shards that broke (in order), and the raw samples decoded or tried (``seen``)."""

    skipped: Counter = field(default_factory=Counter)
    broken: list[str] = field(default_factory=list)
    seen: int = 0

    def sample_skipped(self, reason: str) -> None:
        self.skipped[reason] += 1

    def shard_broke(self, url: str, reason: str, lost: int) -> None:
        self.skipped[reason] += lost
        self.broken.append(url)

    def take(self) -> "Faults":
        """These counts, leaving this empty for the next batch."""
        taken = Faults(Counter(self.skipped), list(self.broken), self.seen)
        self.skipped.clear()
        self.broken.clear()
        self.seen = 0
        return taken

    def add(self, other: "Faults") -> None:
        """Add ``other``'s counts; only the newest few broken shards are kept, for the message."""
        self.skipped.update(other.skipped)
        self.broken = (self.broken + other.broken)[-MAX_BROKEN_NAMED:]
        self.seen += other.seen


def check_skip_rate(faults: Faults, max_skip_rate: float | None, min_samples: int) -> None:
    """SkipRateError once at least ``min_samples`` samples were read or lost and more than
    ``max_skip_rate`` of them were skipped; None: no limit."""
    # Samples a broken shard took away were never read: they count on both sides of the rate.
    total = faults.seen + sum(v for k, v in faults.skipped.items() if k in SHARD_REASONS)
    if max_skip_rate is None or total < min_samples:
        return
    skipped = sum(faults.skipped.values())
    if skipped > max_skip_rate * total:
        reasons = ", ".join(f"{k} {v}" for k, v in faults.skipped.most_common())
        broken = f"; broken shards: {', '.join(faults.broken)}" if faults.broken else ""
        raise SkipRateError(f"{skipped} of {total} samples on this rank were skipped or lost with their shard "
                            f"({reasons}){broken}: more than data.max_skip_rate={max_skip_rate}. Find the "
                            f"broken shards with `python -m pretrain.data.check`, or raise data.max_skip_rate")
