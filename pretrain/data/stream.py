"""A rank's sample stream: the DataLoader over its :class:`ShardDataset` (the stages, composed in
:mod:`pretrain.data.dataset`), and what the trainer consumed of it.

The :class:`Loader` records, per worker role, how far into which epoch the trainer has consumed,
and the faults the workers met (:mod:`pretrain.data.faults`); a loader restored from its state
continues with exactly the batches an uninterrupted one would yield.

A run resumed on another number of ranks or workers continues its interrupted epoch with exactly
the samples the old readers had not handed out, dealt over the new readers, then reads ordinary
epochs (:mod:`pretrain.data.deal`).
"""

from __future__ import annotations

import os
from collections import Counter
from functools import partial
from typing import Iterator

import numpy as np
from torch.utils.data import DataLoader, IterableDataset

from pretrain import hooks
from pretrain.data.dataset import ShardDataset, SyntheticDataset
from pretrain.data.deal import Generation, Plan
from pretrain.data.faults import Faults, check_skip_rate
from pretrain.data.workers import end_workers_at_exit, end_workers_now, shield_worker

__all__ = ["Loader", "ShardDataset", "SyntheticDataset"]  # the datasets: what a Loader reads


class _WorkerBatches(IterableDataset):
    """What the DataLoader runs in its workers: ``dataset``'s batches with their bookkeeping."""

    def __init__(self, dataset: IterableDataset) -> None:
        self.dataset = dataset

    def __iter__(self):
        return self.dataset.worker_batches()


class Loader:
    """A DataLoader over a stream dataset that remembers what the trainer consumed.

    ``state_dict()`` holds, per worker role, the (epoch, raw sample) after the last consumed batch;
    a loader restored from it continues with exactly the batches an uninterrupted one would yield.
    With ``max_skip_rate``, iteration stops with :class:`~pretrain.data.faults.SkipRateError` once
    at least ``min_samples`` samples were read or lost and more than that share of them was skipped
    (a broken shard counts as the samples it took away, as far as the index knows them, else as one).
    """

    def __init__(self, dataset: IterableDataset, workers: int, pin_memory: bool = False,
                 max_skip_rate: float | None = None, min_samples: int = 100) -> None:
        self.dataset = dataset
        self.workers = workers
        self.pin_memory = pin_memory
        self.max_skip_rate = max_skip_rate
        self.min_samples = min_samples
        self.consumed = 0
        self.positions: dict[int, tuple[int, int]] = {}
        self.faults = Faults()  # of the batches consumed, on this rank
        self.plan: Plan | None = None  # after an elastic resume: who reads the rest of the interrupted epochs
        self._plan_state: dict | None = None  # self.plan.to_dict(), made once (state_dict runs every batch)

    @property
    def skipped(self) -> Counter:
        """Samples skipped or lost with their shard, by reason."""
        return self.faults.skipped

    @property
    def broken(self) -> list[str]:
        """The shards that broke, newest last (a few, for the message)."""
        return self.faults.broken

    @property
    def seen(self) -> int:
        """Raw samples the consumed batches' workers decoded or tried."""
        return self.faults.seen

    def __iter__(self) -> Iterator[dict]:
        roles = max(self.workers, 1)
        # The DataLoader serves its workers round-robin from worker 0; rotate roles so that the
        # next batch comes from the role an uninterrupted run would have used.
        self.dataset.roles = [(w + self.consumed) % roles for w in range(roles)]
        first = self.plan.start_epoch() if self.plan is not None else 0
        self.dataset.start = {role: self.positions.get(role, (first, 0)) for role in range(roles)}
        self.dataset.plan = self.plan
        loader = DataLoader(_WorkerBatches(self.dataset), batch_size=None, num_workers=self.workers,
                            pin_memory=self.pin_memory, persistent_workers=False,
                            worker_init_fn=partial(shield_worker, rank_pid=os.getpid()) if self.workers else None)
        batches = iter(loader)
        end_workers_at_exit(batches)
        try:
            for delivered in batches:
                self.positions[delivered.role] = tuple(delivered.position)
                self.faults.add(delivered.faults)
                self.consumed += 1
                hooks.fire("batch", rank=getattr(self.dataset, "rank", 0), keys=delivered.batch.get("__keys__", ()))
                check_skip_rate(self.faults, self.max_skip_rate, self.min_samples)
                yield delivered.batch
        except Exception:
            end_workers_now(batches)  # they ignore SIGTERM: torch's shutdown of a failed loader leaves them
            raise

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
        self.faults.seen = state.get("seen", 0)
        self.positions = {int(k): tuple(v) for k, v in state["positions"].items()}
        self.faults.skipped = Counter(state.get("skipped", {}))
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
        self.faults.seen = sum(state.get("seen", 0) for state in states) if main else 0
        self.faults.skipped = sum((Counter(state.get("skipped", {})) for state in states), Counter()) if main else Counter()
