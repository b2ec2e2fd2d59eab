"""The metrics window: which steps log, and its state, which a resumed run takes up where it was cut."""

from __future__ import annotations

import pytest
import torch

from pretrain.dist import DistEnv
from pretrain.metrics_window import MetricsWindow


def window() -> MetricsWindow:
    return MetricsWindow(DistEnv(), global_batch=8, log_every=4, total_steps=10)


def test_whole_windows_and_the_last_step_log():
    assert [step for step in range(10) if window().logs_after(step)] == [3, 7, 9]


def test_a_window_cut_by_a_checkpoint_flushes_the_same_after_a_resume():
    whole, cut = window(), window()
    losses = [(1.0, 0.5), (3.0, 0.25), (2.0, 1.0)]
    for loss, acc in losses[:2]:
        for w in (whole, cut):
            w.add(torch.tensor(loss), {"acc": torch.tensor(acc)})
    state = cut.state_dict()
    assert state == {"loss": 4.0, "values": {"acc": 0.75}, "micro": 2}
    assert cut.reshard(state, saved_world_size=4) == state  # already one rank's share of the average
    resumed = window()
    resumed.load_state_dict(state)
    for w in (whole, resumed):
        w.add(torch.tensor(losses[2][0]), {"acc": torch.tensor(losses[2][1])})
    (_, expected), (_, got) = whole.flush(), resumed.flush()
    assert got["train/loss"] == pytest.approx(expected["train/loss"]) == pytest.approx(2.0)
    assert got["train/acc"] == pytest.approx(expected["train/acc"])
    assert resumed.micro == 0 and resumed.state_dict()["loss"] == 0.0  # a flush starts a new window
