"""The step guard within a step: a non-finite loss on the device skips the step, and the skip and a
stop request are agreed on together; its counts go into checkpoints."""

from __future__ import annotations

import pytest
import torch

from pretrain.step_guard import NonFiniteLossError, StepGuard


def guard() -> StepGuard:
    return StepGuard(max_in_a_row=2, last_checkpoint=lambda: None)


def test_a_non_finite_loss_in_any_micro_step_skips_the_step_and_is_not_summed():
    g = guard()
    g.start_step()
    assert g.finite_loss(torch.tensor(float("nan"))).item() == 0.0
    assert g.finite_loss(torch.tensor(2.0, dtype=torch.bfloat16)).dtype == torch.float32
    assert [f.item() for f in g.agree(stop_requested=False)] == [1.0, 0.0]
    g.start_step()  # the next step starts clean
    g.finite_loss(torch.tensor(1.5))
    assert [f.item() for f in g.agree(stop_requested=True)] == [0.0, 1.0]


def test_the_counts_round_trip_and_an_older_checkpoint_without_overflows_loads():
    g = guard()
    g.record(0, True, None, lambda line: None)
    g.record(1, False, (None, None), lambda line: None)
    state = g.state_dict()
    assert state == {"nonfinite_steps": 1, "overflow_steps": 1}
    resumed = guard()
    resumed.load_state_dict(resumed.reshard(state, saved_world_size=3))
    assert resumed.state_dict() == state
    resumed.load_state_dict({"nonfinite_steps": 2})
    assert (resumed.nonfinite_steps, resumed.overflow_steps) == (2, 0)


def test_settling_reads_the_noted_steps_once_and_accounts_for_them_as_record_would():
    g, lines = guard(), []
    ok, bad = torch.tensor(0.0), torch.tensor(1.0)
    g.note(0, bad, ok, None, None)  # a non-finite loss
    g.note(1, ok, ok, bad, None)  # non-finite gradients, skipped on the device
    g.note(2, ok, bad, ok, None)  # a rank was asked to stop
    assert lines == [] and g.nonfinite_steps == 0  # nothing is read before the settling
    assert g.settle(lines.append) is True
    assert (g.nonfinite_steps, g.overflow_steps) == (1, 1)
    assert lines == ["step 0: non-finite loss, step skipped (1 in a row, 1 in all)",
                     "step 1: non-finite gradients, step skipped (1 such steps in all)"]
    assert g.settle(lines.append) is False and len(lines) == 2  # each step is accounted for once


def test_a_stop_after_too_many_in_a_row_names_the_step_that_reached_the_limit():
    g = guard()
    for step in range(4):
        g.note(step, torch.tensor(1.0), torch.tensor(0.0), None, None)
    with pytest.raises(NonFiniteLossError, match=r"^step 1: 2 non-finite losses in a row"):
        g.settle(lambda line: None)
