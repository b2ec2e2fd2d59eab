"""fp16 loss-scale underflow: steps that keep overflowing at the minimum loss scale stop the run with a
message naming the step, instead of being skipped forever.

DeepSpeed refuses fp16 on a CPU without fp16 support (half of CI's passes deny it), so the detection is
tested on DeepSpeed's own loss-scale objects driven as its optimizers drive them at each overflow,
behind an engine that holds nothing else, and the trainer's StepGuard."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaleConfig

from pretrain.engine import Engine, loss_scale_state, report_loss_scale_floor_in_trainer
from pretrain.step_guard import NonFiniteLossError, StepGuard


def zero_optimizer():
    """What ZeRO's optimizers hold, and how they lower the scale after an overflow."""
    scaler = DynamicLossScaler(init_scale=8, scale_window=1000, min_scale=1, delayed_shift=1,
                               consecutive_hysteresis=False)
    return SimpleNamespace(loss_scaler=scaler), lambda: scaler.update_scale(True)


def fp16_optimizer():
    """What FP16_Optimizer (no ZeRO) holds, and how it lowers the scale after an overflow."""
    config = LossScaleConfig(torch.float16, True, 0, {"init_scale": 8, "scale_window": 1000, "min_scale": 1,
                                                      "delayed_shift": 1, "consecutive_hysteresis": False})

    def overflow():
        config.cur_scale = max(config.cur_scale / config.scale_factor, config.min_loss_scale)
    return SimpleNamespace(loss_scale_config=config), overflow


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, line: str) -> None:
        self.lines.append(line)


@pytest.mark.parametrize("make", [zero_optimizer, fp16_optimizer])
def test_overflows_at_the_minimum_loss_scale_stop_the_run_naming_the_step(monkeypatch, make):
    import deepspeed.runtime.fp16.loss_scaler as scalers

    monkeypatch.setattr(scalers.dist, "get_rank", lambda: 0)  # its log lines ask; no process group here
    optimizer, overflow = make()
    report_loss_scale_floor_in_trainer(optimizer)  # as Engine does: DeepSpeed must not raise first
    applied = [True]
    engine = Engine.__new__(Engine)
    engine.engine = SimpleNamespace(optimizer=optimizer, was_step_applied=lambda: applied[0])
    guard = StepGuard(max_in_a_row=3, last_checkpoint=lambda: "step_00000000")
    log = Log()

    assert loss_scale_state(optimizer) == (8.0, 1.0)
    guard.record(0, False, engine.fp16_overflow(), log.write)  # a step that was applied
    assert guard.overflow_steps == 0 and not log.lines
    applied[0] = False
    with pytest.raises(NonFiniteLossError) as stopped:
        for step in range(1, 20):
            overflow()  # DeepSpeed skipped the step and lowered the scale: 4, 2, 1, 1, 1
            guard.record(step, False, engine.fp16_overflow(), log.write)
    assert step == 5 and guard.overflow_steps == 5
    assert str(stopped.value).startswith("step 5: fp16 gradients overflowed in 3 steps in a row at the minimum "
                                         "loss scale 1 (train.max_nonfinite=3)")
    assert str(stopped.value).endswith("The last complete checkpoint is step_00000000")
    assert log.lines[0] == "step 1: fp16 gradient overflow, step skipped (loss scale now 4, 1 overflows in all)"


def test_bf16_and_fp32_have_no_loss_scale():
    assert loss_scale_state(SimpleNamespace()) is None
    config = LossScaleConfig(torch.bfloat16, False, 1.0, None)
    assert loss_scale_state(SimpleNamespace(loss_scale_config=config)) is None


def test_non_finite_losses_are_counted_and_several_in_a_row_stop_the_run():
    guard, log = StepGuard(max_in_a_row=2, last_checkpoint=lambda: None), Log()
    for step, nonfinite in enumerate([True, False, True, False]):  # never two in a row: the run goes on
        guard.record(step, nonfinite, None, log.write)
    assert guard.nonfinite_steps == 2 and guard.nonfinite_in_a_row == 0
    assert log.lines == ["step 0: non-finite loss, step skipped (1 in a row, 1 in all)",
                         "step 2: non-finite loss, step skipped (1 in a row, 2 in all)"]
    guard.record(4, True, None, log.write)
    with pytest.raises(NonFiniteLossError, match=r"^step 5: 2 non-finite losses in a row \(train.max_nonfinite=2\); "
                                                 r"stopping. The last complete checkpoint is none$"):
        guard.record(5, True, None, log.write)
    assert guard.nonfinite_steps == 4


def test_steps_deepspeed_skips_without_a_loss_scale_are_counted():
    # fp32 and bf16: DeepSpeed's ZeRO optimizers skip a step whose gradients are not finite, with no
    # scale to lower (issue 29: five "OVERFLOW! Skipping step" lines, run.json said 0).
    applied = [False]
    engine = Engine.__new__(Engine)
    engine.engine = SimpleNamespace(optimizer=SimpleNamespace(), was_step_applied=lambda: applied[0])
    guard = StepGuard(max_in_a_row=3, last_checkpoint=lambda: "step_00000002")
    log = Log()
    guard.record(0, False, engine.fp16_overflow(), log.write)
    applied[0] = True
    guard.record(1, False, engine.fp16_overflow(), log.write)
    assert guard.overflow_steps == 1
    # No fp16 and no loss scale in these precisions: the lines say what happened in any precision.
    assert log.lines == ["step 0: non-finite gradients, step skipped (1 such steps in all)"]
    applied[0] = False
    with pytest.raises(NonFiniteLossError) as stopped:
        for step in range(2, 10):
            guard.record(step, False, engine.fp16_overflow(), log.write)
    assert guard.overflow_steps == 4
    assert str(stopped.value) == ("step 4: the gradients were not finite in 3 steps in a row (train.max_nonfinite=3); "
                                  "stopping. Use a lower lr or train.clip_grad. The last complete checkpoint is "
                                  "step_00000002")
