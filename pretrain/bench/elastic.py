"""python -m pretrain.bench elastic: what one rank computes for the epoch plan and an elastic resume, at
ImageNet-21K's size by default (14.2M samples in 14,200 shards, 1,024 ranks x 10 workers -> 768 ranks).

Rows, for one rank (time, then peak Python memory in a second run under tracemalloc): its readers'
pieces of the epoch; which samples they had consumed at a mid-epoch resume position (their shuffle buffers replayed over
positions); after the resume on fewer ranks, its readers' pieces of the rest of the epoch. The baseline
is the same resume worked out for every reader of the new run at once (what a rank would do that
derived the whole deal); the candidate is one rank's share. Goal: under 1 s and 500 MB per rank.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from pretrain.data.deal import Generation, Plan, consumed, shuffle_rng
from pretrain.data.split import pieces_at

EPOCH = 3  # the interrupted epoch


def shard_counts(shards: int, samples: int) -> np.ndarray:
    """About ``samples / shards`` per shard (±10%), summing to ``samples``."""
    mean = samples // shards
    counts = np.random.default_rng(1).integers(mean - mean // 10, mean + mean // 10 + 1, shards)
    short = samples - int(counts.sum())
    counts[:shards // 2] += short // (shards // 2)
    counts[0] += short - (short // (shards // 2)) * (shards // 2)
    return counts


def stop_positions(slots: int, workers: int, handed: int = 128, batch: int = 32) -> np.ndarray:
    """Mid-epoch: every reader handed out ``handed`` samples, the first 3 workers of each rank a batch more
    (the DataLoader serves its workers in turn)."""
    return np.stack([np.full(slots, EPOCH), handed + batch * (np.arange(slots) % workers < 3)], axis=1)


def ordered_shards(counts: np.ndarray, seed: int) -> tuple[list[str], list[int]]:
    order = np.random.default_rng(seed).permutation(len(counts))
    return [f"shard-{i:06d}.tar" for i in order], counts[order].tolist()


def epoch_plan(plan: Plan, shards, rank: int) -> int:
    urls, counts = shards
    gen = plan.current
    return sum(len(pieces_at(urls, counts, plan.positions(EPOCH, rank * gen.workers + w))) for w in range(gen.workers))


def resume_position(plan: Plan, stopped: np.ndarray, rank: int) -> int:
    gen, found = plan.current, 0
    for w in range(gen.workers):
        slot = rank * gen.workers + w
        mine = plan.positions(EPOCH, slot)
        rng = shuffle_rng(plan.seed, EPOCH, rank, w, plan.deal_of(EPOCH))
        found += len(consumed(len(mine), int(stopped[slot, 1]), gen.buffer, rng))
    return found


def elastic(plan: Plan, stopped: np.ndarray, shards, ranks: int, rank_range) -> int:
    urls, counts = shards
    resumed = plan.resumed(stopped, ranks, plan.current.workers, plan.current.buffer)
    found = 0
    for rank in rank_range:
        for w in range(resumed.current.workers):
            rest = resumed.positions(EPOCH, rank * resumed.current.workers + w)
            pieces_at(urls, counts, rest)
            found += len(rest)
    return found


def measure(fn, *args, memory: bool = True) -> tuple[float, float | None, int]:
    """(seconds, peak MB or None, result): timed untraced, then run again under tracemalloc for memory."""
    began = time.perf_counter()
    result = fn(*args)
    elapsed = time.perf_counter() - began
    peak = None
    if memory:
        tracemalloc.start()
        fn(*args)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return elapsed, peak, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.bench elastic", description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=14_200_000)
    parser.add_argument("--shards", type=int, default=14_200)
    parser.add_argument("--ranks", type=int, default=1024)
    parser.add_argument("--new-ranks", type=int, default=768)
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    args = parser.parse_args(argv)
    seed = 0
    counts = shard_counts(args.shards, args.samples)
    shards = ordered_shards(counts, seed)
    plan = Plan(int(counts.sum()), seed, [Generation(args.ranks, args.workers, args.shuffle_buffer)])
    stopped = stop_positions(args.ranks * args.workers, args.workers)
    rank = args.new_ranks // 2
    epoch_plan(plan, shards, 0)  # first-use costs
    rows = [("epoch plan (one rank)", measure(epoch_plan, plan, shards, rank)),
            ("mid-epoch resume position (one rank)", measure(resume_position, plan, stopped, rank)),
            (f"elastic {args.ranks} -> {args.new_ranks} ranks (one rank)",
             measure(elastic, plan, stopped, shards, args.new_ranks, [rank])),
            (f"elastic {args.ranks} -> {args.new_ranks} ranks (every rank, baseline)",
             measure(elastic, plan, stopped, shards, args.new_ranks, range(args.new_ranks), memory=False))]
    print(f"{args.samples:,} samples in {args.shards:,} shards, {args.ranks} ranks x {args.workers} workers, "
          f"shuffle buffer {args.shuffle_buffer}")
    print(f"{'row':<52} {'seconds':>9} {'peak MB':>9} {'samples':>11}")
    for name, (seconds, megabytes, found) in rows:
        peak = "n/a" if megabytes is None else f"{megabytes:.1f}"
        print(f"{name:<52} {seconds:>9.3f} {peak:>9} {found:>11,}")
    print(f"ratio {rows[3][1][0] / rows[2][1][0]:.1f} (every rank's share of the rest of the epoch over one rank's, "
          f"time; one rank: {rows[2][1][0]:.3f} s, {rows[2][1][1]:.1f} MB, goal < 1 s and < 500 MB)")
    return 0
