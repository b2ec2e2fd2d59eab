"""The data position as a run's state: every rank's position saved, and the path a resume takes with
it (this rank's own, dealt anew over other processes or workers, an old one-rank position)."""

from __future__ import annotations

import pytest

from pretrain.data.position import DataPosition
from pretrain.dist import DistEnv
from pretrain.errors import CheckpointError
from pretrain.state.stateful import Stateful

PLAN = {"generations": [[2, 1, 0]]}


class RecordingLoader:
    """The Loader's public state methods, recording what they were given."""

    def __init__(self, workers: int, refuse: str = "") -> None:
        self.workers, self.refuse = workers, refuse
        self.loaded: dict | None = None
        self.dealt: list[dict] | None = None

    def state_dict(self) -> dict:
        return {"consumed": 3, "workers": self.workers, "positions": {0: [0, 12]}, "plan": PLAN}

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state

    def resume_elsewhere(self, states: list[dict]) -> None:
        if self.refuse:
            raise ValueError(self.refuse)
        self.dealt = states


def test_every_ranks_position_is_saved_with_the_plan_once():
    position = DataPosition(RecordingLoader(workers=2), DistEnv())
    assert isinstance(position, Stateful)
    assert position.state_dict() == {"ranks": [{"consumed": 3, "workers": 2, "positions": {0: [0, 12]}}],
                                     "plan": PLAN}


def test_the_position_comes_from_the_batches_the_trainer_takes_once_they_run():
    class Ahead:
        def state_dict(self) -> dict:
            return {"consumed": 1, "workers": 2, "plan": None}

    position = DataPosition(RecordingLoader(workers=2), DistEnv())
    position.follow(Ahead())
    assert position.state_dict() == {"ranks": [{"consumed": 1, "workers": 2}], "plan": None}


def test_the_same_processes_and_workers_take_their_own_position():
    saved = DataPosition(RecordingLoader(workers=2), DistEnv()).state_dict()
    loader = RecordingLoader(workers=2)
    DataPosition(loader, DistEnv()).load_state_dict(saved)
    assert loader.loaded == {"consumed": 3, "workers": 2, "positions": {0: [0, 12]}, "plan": PLAN}
    assert loader.dealt is None


def test_other_processes_or_workers_deal_every_old_ranks_position():
    two_ranks = {"ranks": [{"consumed": 3, "workers": 2}, {"consumed": 3, "workers": 2}], "plan": PLAN}
    loader = RecordingLoader(workers=2)
    position = DataPosition(loader, DistEnv())
    position.load_state_dict(position.reshard(two_ranks, saved_world_size=2))
    assert loader.dealt == [{"consumed": 3, "workers": 2, "plan": PLAN}] * 2 and loader.loaded is None

    other_workers = RecordingLoader(workers=1)
    DataPosition(other_workers, DistEnv()).load_state_dict({"ranks": two_ranks["ranks"][:1], "plan": None})
    assert other_workers.dealt == [{"consumed": 3, "workers": 2, "plan": None}]


def test_a_position_that_cannot_be_dealt_names_the_new_layout():
    loader = RecordingLoader(workers=1, refuse="the shards have no per-shard sample counts")
    with pytest.raises(CheckpointError, match="^resuming on 1 processes x 1 data workers: the shards have no"):
        DataPosition(loader, DistEnv()).load_state_dict({"ranks": [{"workers": 2}], "plan": None})


def test_an_old_one_rank_position_resumes_on_as_many_processes_only():
    old = {"consumed": 3, "workers": 2, "positions": {}}
    loader = RecordingLoader(workers=2)
    position = DataPosition(loader, DistEnv())
    position.load_state_dict(old)
    assert loader.loaded == old
    with pytest.raises(CheckpointError, match="written by 2 processes by an older vitscale, which kept one rank's "
                                              "data position: resume it on 2 processes"):
        position.reshard(old, saved_world_size=2)
