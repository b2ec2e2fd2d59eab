"""MomentumTeacher without DeepSpeed (fp32 parameters are their own masters): the EMA, what its
state dict holds, and a load rebuilding the weights; CollapseWatch's warning."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from pretrain.dist import DistEnv
from pretrain.engine import MasterSlice
from pretrain.models.teacher import MomentumTeacher
from pretrain.objectives.monitors import CollapseWatch


class PlainEngine:
    """The engine's view of fp32 training without ZeRO: every parameter is its own master."""

    def __init__(self, applied: float = 1.0) -> None:
        self.flag = torch.tensor(applied)

    def master_slices(self, params):
        return [MasterSlice(p.data.view(-1), 0, False) for p in params]

    def applied(self) -> torch.Tensor:
        return self.flag


def test_a_skipped_step_leaves_the_teacher_exactly_as_it_was():
    net = student()
    teacher = MomentumTeacher({"net": net}, DistEnv(), {"net": student})
    teacher.update(0.9, PlainEngine())
    before = teacher.master.clone()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)  # what a step would have moved
    teacher.update(0.9, PlainEngine(applied=0.0))
    assert torch.equal(teacher.master, before)
    teacher.update(0.9, PlainEngine())
    assert not torch.equal(teacher.master, before)


def student() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    net[1].weight.requires_grad_(False)  # a frozen parameter is copied, not followed
    return net


def test_ema_state_dict_and_load():
    net = student()
    teacher = MomentumTeacher({"net": net}, DistEnv(), {"net": student})
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    for momentum in (0.5, 0.9):
        with torch.no_grad():
            for p in net.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        teacher.update(momentum, PlainEngine())
        for k, p in net.named_parameters():
            if p.requires_grad:
                expected[k] = expected[k] * momentum + p.detach() * (1 - momentum)
    for k, p in teacher.nets["net"].named_parameters():
        assert torch.allclose(p, expected[k], atol=1e-7), k
    state = teacher.state_dict()
    assert not any(k.startswith("nets.") for k in state)  # the weights are ``master`` cast once
    fresh = MomentumTeacher({"net": student()}, DistEnv(), {"net": student})
    fresh.load_state_dict(state)
    assert torch.equal(fresh.master, teacher.master)
    for (k, a), b in zip(fresh.nets["net"].named_parameters(), teacher.nets["net"].parameters()):
        assert torch.equal(a, b), k
    assert torch.allclose(fresh.full_state_dict("net")["0.weight"], expected["0.weight"], atol=1e-7)


class RoundedEngine:
    """The engine's view under ZeRO-3 with the fp32 masters on NVMe: the student's bf16 weights,
    rewritten in place by each optimizer step (``step``)."""

    def __init__(self, params) -> None:
        self.params = params
        self.rounded = [p.detach().bfloat16().view(-1) for p in params]

    def step(self) -> None:
        for r, p in zip(self.rounded, self.params):
            r.copy_(p.detach().view(-1))

    def master_slices(self, params):
        assert list(params) == self.params
        return [MasterSlice(r, 0, False) for r in self.rounded]

    def applied(self) -> torch.Tensor:
        return torch.tensor(1.0)


def test_ema_of_rounded_weights_when_the_masters_are_on_disk():
    """The teacher's fp32 state follows the bf16 weights exactly (no rounding of the state itself:
    a momentum of 0.999 moves it by far less than a bf16 step)."""
    net = student()
    teacher = MomentumTeacher({"net": net}, DistEnv(), {"net": student})
    followed = [p for p in net.parameters() if p.requires_grad]
    expected = [p.detach().clone() for p in followed]
    engine = RoundedEngine(followed)
    for momentum in (0.5, 0.999):
        with torch.no_grad():
            for p in followed:
                p.add_(torch.randn_like(p))
        engine.step()
        teacher.update(momentum, engine)
        expected = [e * momentum + p.detach().bfloat16().float() * (1 - momentum) for e, p in zip(expected, followed)]
    teacher_params = [p for p, s in zip(teacher.nets["net"].parameters(), net.parameters()) if s.requires_grad]
    for p, e in zip(teacher_params, expected):
        torch.testing.assert_close(p, e, atol=1e-6, rtol=1e-6)
    assert teacher.master.dtype == torch.float32


def test_collapse_watch_warns(caplog):
    watch = CollapseWatch(every=2, is_main=True)
    watch.record({"embedding_std": torch.tensor(0.01), "teacher_entropy": torch.tensor(0.5)})
    with caplog.at_level(logging.WARNING, logger="pretrain.collapse"):
        assert watch.check(0, low={"embedding_std": 0.05}) == []  # not a checking step
        found = watch.check(1, low={"embedding_std": 0.05}, high={"teacher_entropy": 0.99})
    assert len(found) == 1 and "embedding_std" in found[0]
    assert "possible collapse" in caplog.text
