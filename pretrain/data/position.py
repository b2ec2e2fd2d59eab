"""The training stream's position as a run's state (:class:`pretrain.state.stateful.Stateful`): every
rank's place in it, so that a run on any number of processes or data workers can take it up.

Saved: ``{"ranks": [each rank's Loader.state_dict() without its plan, in rank order], "plan": the
plan, the same on every rank}``. A checkpoint written before every rank's position was kept holds
one rank's ``Loader.state_dict()`` instead; it resumes on as many processes only.
"""

from __future__ import annotations

from pretrain.dist import DistEnv
from pretrain.errors import CheckpointError


class DataPosition:
    def __init__(self, loader, dist: DistEnv) -> None:
        """``loader``: this rank's training :class:`~pretrain.data.stream.Loader`."""
        self.loader, self.dist = loader, dist
        self.source = loader  # what knows the position of the last batch the trainer took

    def follow(self, batches) -> None:
        """Take the position from ``batches`` (:class:`~pretrain.data.prefetch.DeviceBatches` over the
        loader) while they run: they read ahead of the trainer, and know where its last batch ended."""
        self.source = batches

    def state_dict(self) -> dict:
        """Every rank's position (a collective: gathered into every rank's copy, since the engine keeps
        one rank's copy only)."""
        position = dict(self.source.state_dict())
        plan = position.pop("plan", None)  # the same on every rank: kept once
        return {"ranks": self.dist.gather_objects(position), "plan": plan}

    def reshard(self, state: dict, saved_world_size: int) -> dict:
        """Unchanged: it holds every old rank's position, which :meth:`load_state_dict` deals over this
        run's readers. An old checkpoint's one-rank position cannot be dealt."""
        if "ranks" not in state:
            raise CheckpointError(f"the checkpoint was written by {saved_world_size} processes by an older vitscale, "
                                  f"which kept one rank's data position: resume it on {saved_world_size} processes")
        return state

    def load_state_dict(self, state: dict) -> None:
        """This rank's own position when the processes and workers are those that saved it; else the
        rest of the interrupted epochs dealt over this run's readers (``Loader.resume_elsewhere``)."""
        if "ranks" not in state:  # an old checkpoint's one-rank position, on as many processes
            self.loader.load_state_dict(state)
            return
        ranks = [{**position, "plan": state.get("plan")} for position in state["ranks"]]
        if len(ranks) == self.dist.world_size and ranks[0]["workers"] == self.loader.workers:
            self.loader.load_state_dict(ranks[self.dist.rank])
            return
        try:
            self.loader.resume_elsewhere(ranks)
        except ValueError as e:
            raise CheckpointError(f"resuming on {self.dist.world_size} processes x {self.loader.workers} "
                                  f"data workers: {e}") from None
