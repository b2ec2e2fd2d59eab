"""The evaluator: when validation is due, and its pass (sums over every batch, divided by the count)."""

from __future__ import annotations

import contextlib

import torch

from pretrain.dist import DistEnv
from pretrain.evaluator import Evaluator


class CountingObjective:
    def val_step(self, batch: dict) -> dict[str, torch.Tensor]:
        assert not any(k.startswith("__") for k in batch)  # bookkeeping keys stay on the host
        return {"top1": (batch["label"] == 1).sum(), "count": torch.tensor(len(batch["label"]))}


class ModeEngine:
    def __init__(self) -> None:
        self.modes: list[str] = []

    def eval(self) -> None:
        self.modes.append("eval")

    def train(self) -> None:
        self.modes.append("train")

    def autocast(self):
        return contextlib.nullcontext()


def evaluator(val_loader=None, every: int = 0) -> Evaluator:
    return Evaluator(CountingObjective(), ModeEngine(), val_loader, DistEnv(), every, image_size=8)


def test_validation_is_due_every_eval_every_steps_before_the_end():
    assert [step for step in range(1, 11) if evaluator(every=3).due(step, end=9)] == [3, 6]
    assert not any(evaluator(every=0).due(step, end=10) for step in range(1, 11))


def test_the_metrics_are_sums_over_every_batch_divided_by_the_count():
    batches = [{"label": torch.tensor([1, 0, 1]), "__keys": ["a", "b", "c"]}, {"label": torch.tensor([1])}]
    e = evaluator(batches)
    assert e.evaluate() == {"val/top1": 0.75}
    assert e.engine.modes == ["eval", "train"]  # back to training afterwards
    assert evaluator(None).evaluate() == {}
