"""The step guard within a step: a non-finite loss on the device skips the step, and the skip and a
stop request are agreed on together; its counts go into checkpoints."""

from __future__ import annotations

import torch

from pretrain.step_guard import StepGuard


def guard() -> StepGuard:
    return StepGuard(max_in_a_row=2, last_checkpoint=lambda: None)


def test_a_non_finite_loss_in_any_micro_step_skips_the_step_and_is_not_summed():
    g = guard()
    g.start_step()
    assert g.finite_loss(torch.tensor(float("nan"))).item() == 0.0
    assert g.finite_loss(torch.tensor(2.0, dtype=torch.bfloat16)).dtype == torch.float32
    assert g.agree(stop_requested=False) == (True, False)
    g.start_step()  # the next step starts clean
    g.finite_loss(torch.tensor(1.5))
    assert g.agree(stop_requested=True) == (False, True)


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
