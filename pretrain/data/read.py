"""The read stage: the raw samples of a slot's share, each shard through its format's reader
(:mod:`pretrain.data.readers`), with the faults of shards that break counted.

A broken, vanished or stalled shard is counted, logged, and left for the next one (the samples read
before the problem are kept). It is counted as the samples of the piece it took away when the index
gives the shard's count, else as one.
"""

from __future__ import annotations

import logging
from contextlib import closing
from typing import Iterator

from pretrain.data import readers
from pretrain.data.faults import Faults
from pretrain.data.readers.parquet import Columns
from pretrain.data.shards import BrokenShard
from pretrain.data.split import Piece, Share

log = logging.getLogger(__name__)


class ShardReader:
    """Reads shares of shards whose sample counts, where known, are ``count_of`` (url -> samples);
    ``timeout``: seconds a shard may stay silent; ``columns``: the image and label columns of
    formats that have columns."""

    def __init__(self, count_of: dict[str, int], timeout: float | None = None, columns: Columns = Columns()) -> None:
        self.count_of = count_of
        self.timeout = timeout
        self.columns = columns

    def samples(self, share: Share, faults: Faults) -> Iterator[dict]:
        """The raw samples of ``share``, in shard order; broken shards counted into ``faults``."""
        if share.stride == 1:
            yield from self.read(share.pieces, faults)
            return
        # Every slot reads these shards: the first one counts their faults, once.
        counted = faults if share.offset == 0 else Faults()
        for i, sample in enumerate(self.read(share.pieces, counted)):
            if i % share.stride == share.offset:
                yield sample

    def read(self, pieces: tuple[Piece, ...], faults: Faults) -> Iterator[dict]:
        """The samples of ``pieces``, each read by its shard's format."""
        for piece in pieces:
            read = piece.start  # the position after the last sample read
            reason = None
            try:
                samples = readers.reader_for(piece.url).samples(piece.url, piece.start, self.timeout, self.columns)
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
            expected = self.expected(piece)
            if reason is None and expected is not None and read < expected:  # cut at a block boundary
                reason = "truncated_shard"
                log.warning("%s: ends after %d samples, the index says %d", piece.url, read, expected)
            if reason is not None:
                faults.shard_broke(piece.url, reason, self.lost(piece, read))

    def expected(self, piece: Piece) -> int | None:
        """Where ``piece`` ends in its shard, in samples, if known."""
        return piece.stop if piece.stop is not None else self.count_of.get(piece.url)

    def lost(self, piece: Piece, read: int) -> int:
        """Samples of ``piece`` that a shard breaking after ``read`` samples took away (1 if unknown)."""
        stop = self.expected(piece)
        if stop is None:
            return 1
        return max(1, stop - max(read, piece.start))
