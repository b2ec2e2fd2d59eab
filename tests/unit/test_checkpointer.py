"""The Checkpointer alone: components saved by name and loaded back, re-sharded when the number of
processes changed, an old checkpoint's run state read by today's names; with a stand-in engine that
keeps its client state in one file, as DeepSpeed's does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.dist import DistEnv
from pretrain.plan import make_plan
from pretrain.state.checkpointer import Checkpointer
from pretrain.state.layout import tag_for
from pretrain.state.stateful import Stateful


class ClientStateEngine:
    """Writes its client state into one file and reads it back with an entry of its own besides."""

    def __init__(self) -> None:
        self.module = torch.nn.Linear(4, 2)
        self.dist = DistEnv()

    def weights_finite(self) -> bool:
        return True

    def save(self, directory: str, tag: str, client_state: dict) -> list[str]:
        path = Path(directory) / tag
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.module.state_dict(), **client_state}, path / "shard.pt")
        return [str(path / "shard.pt")]

    def reshards(self, saved_world_size: int | None) -> bool:
        return False

    def load(self, directory: str, tag: str) -> dict:
        return torch.load(Path(directory) / tag / "shard.pt", weights_only=True)


class Counter:
    def __init__(self, value: int = 0) -> None:
        self.value = value
        self.resharded_from: list[int] = []

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]

    def reshard(self, state: dict, saved_world_size: int) -> dict:
        self.resharded_from.append(saved_world_size)
        return {"value": state["value"] * 100}


class Recorder:
    """Keeps whatever state it is given."""

    def __init__(self) -> None:
        self.state: dict | None = None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        self.state = state

    def reshard(self, state: dict, saved_world_size: int) -> dict:
        return state


def checkpointer(run_dir: Path, components: dict, *overrides: str) -> Checkpointer:
    cfg = load_config(None, ["data.synthetic=true", "data.num_classes=10", "train.steps=8", "train.ckpt_every=2",
                             f"run.dir={run_dir}", *overrides])
    return Checkpointer(cfg, make_plan(cfg, 1, None), DistEnv(), ClientStateEngine(), components)


def test_components_are_saved_by_name_and_loaded_back(tmp_path):
    saving = checkpointer(tmp_path, {"a": Counter(3), "b": Counter(5)})
    assert saving.due(2) and not saving.due(3)
    assert saving.save(4) == tag_for(4) and saving.latest() == tag_for(4)

    a, b, added = Counter(), Counter(), Counter(7)
    resuming = checkpointer(tmp_path, {"a": a, "b": b, "added": added})
    assert resuming.resume() == tag_for(4)
    assert (a.value, b.value) == (3, 5) and not a.resharded_from  # as many processes: no re-sharding
    assert added.value == 7  # a component the checkpoint has no state for keeps its own
    assert resuming.resized is None and not resuming.due(4, last=True)  # step 4 is saved already
    assert all(isinstance(c, Stateful) for c in (a, b, added))


def test_a_fresh_run_and_train_resume_false_load_nothing(tmp_path):
    a = Counter(1)
    assert checkpointer(tmp_path, {"a": a}).resume() is None
    checkpointer(tmp_path, {"a": Counter(9)}).save(2)
    assert checkpointer(tmp_path, {"a": a}, "train.resume=false").resume() is None and a.value == 1


def test_state_saved_by_another_number_of_processes_is_resharded_by_each_component(tmp_path):
    saving = checkpointer(tmp_path, {})
    meta = {**saving.checkpoint_meta(), "world_size": 4, "global_batch": 256}
    saving.files.save(saving.engine, 6, {"world_size": 4, "a": {"value": 2}}, meta)

    a = Counter()
    resuming = checkpointer(tmp_path, {"a": a})
    assert resuming.resume() == tag_for(6)
    assert a.resharded_from == [4] and a.value == 200
    assert resuming.resized["world_size"] == [4, 1] and resuming.resized["global_batch"] == [256, 64]
    assert resuming.resized["message"].startswith("resuming a run written by 4 processes on 1; the global batch "
                                                  "changes from 256 to 64")


@pytest.mark.parametrize("with_window", [True, False], ids=["window", "older"])
def test_a_checkpoint_of_the_old_format_is_read_by_todays_names(tmp_path, with_window):
    """The run state as vitscale saved it before the components were saved by name: the step guard's
    counts and the metrics window inside the trainer's entry (the window absent in older ones)."""
    saving = checkpointer(tmp_path, {})
    window = {"loss": 1.5, "values": {}, "micro": 2}
    trainer = {"step": 2, "nonfinite_steps": 1, "overflow_steps": 3, "world_size": 1, "global_batch": 64,
               **({"log_window": window} if with_window else {})}
    data = {"ranks": [{"consumed": 2, "workers": 0}], "plan": None}
    saving.files.save(saving.engine, 2, {"trainer": trainer, "data": data}, saving.checkpoint_meta())

    components = {name: Recorder() for name in ("trainer", "step_guard", "log_window", "data")}
    checkpointer(tmp_path, components).resume()
    assert components["trainer"].state == {"step": 2}
    assert components["step_guard"].state == {"nonfinite_steps": 1, "overflow_steps": 3}
    assert components["log_window"].state == (window if with_window else None)
    assert components["data"].state == data


def test_the_meta_data_names_what_a_resume_must_match(tmp_path):
    meta = checkpointer(tmp_path, {}).checkpoint_meta()
    assert meta["parameters"] == {"weight": [2, 4], "bias": [2]}
    assert {k: meta[k] for k in ("world_size", "global_batch", "total_steps", "data_workers")} == \
        {"world_size": 1, "global_batch": 64, "total_steps": 8, "data_workers": 4}


def test_the_trainers_components_keep_the_contract():
    from pretrain.data.position import DataPosition
    from pretrain.metrics_window import MetricsWindow
    from pretrain.step_guard import StepGuard

    components = [StepGuard(3, lambda: None), MetricsWindow(DistEnv(), 8, 1, 4), DataPosition(None, DistEnv())]
    assert all(isinstance(c, Stateful) for c in components)
