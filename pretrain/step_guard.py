"""What becomes of a step that could not be taken.

A non-finite loss (on any rank) skips its step, which is counted; ``max_in_a_row`` of them in a row
stop the run. A step DeepSpeed skipped for an fp16 gradient overflow is counted too; the run stops
once ``max_in_a_row`` in a row overflowed at the minimum loss scale, where lowering the scale can
no longer help. Either stop names the step and the last complete checkpoint.
"""

from __future__ import annotations

from typing import Callable


class NonFiniteLossError(RuntimeError):
    """The run stopped: too many steps in a row could not be taken."""


class StepGuard:
    def __init__(self, max_in_a_row: int, last_checkpoint: Callable[[], str | None]) -> None:
        """``max_in_a_row`` is ``train.max_nonfinite``; ``last_checkpoint()`` names the checkpoint a
        stop message points to."""
        self.max_in_a_row = max_in_a_row
        self.last_checkpoint = last_checkpoint
        self.nonfinite_steps = 0  # in all (kept in checkpoints)
        self.overflow_steps = 0  # fp16 steps DeepSpeed skipped, in all (kept in checkpoints)
        self.nonfinite_in_a_row = 0
        self.overflows_at_floor = 0  # fp16 overflows in a row at the minimum loss scale

    def record(self, step: int, nonfinite: bool, overflow: tuple[float, float] | None,
               write: Callable[[str], None]) -> None:
        """Account for ``step``: ``nonfinite`` when its loss was not finite on some rank (it was
        skipped), else ``overflow``, (loss scale now, minimum) when DeepSpeed skipped it for an fp16
        overflow. ``write`` logs a line; NonFiniteLossError stops the run."""
        if nonfinite:
            self.nonfinite_steps += 1
            self.nonfinite_in_a_row += 1
            write(f"step {step}: non-finite loss, step skipped "
                  f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_steps} in all)")
            self._stop_at_limit(self.nonfinite_in_a_row, f"step {step}: {self.nonfinite_in_a_row} non-finite "
                                                         f"losses in a row")
            return
        self.nonfinite_in_a_row = 0
        if overflow is None:
            self.overflows_at_floor = 0
            return
        scale, floor = overflow
        self.overflow_steps += 1
        self.overflows_at_floor = self.overflows_at_floor + 1 if scale <= floor else 0
        write(f"step {step}: fp16 gradient overflow, step skipped (loss scale now {scale:g}, "
              f"{self.overflow_steps} overflows in all)")
        self._stop_at_limit(self.overflows_at_floor,
                            f"step {step}: fp16 gradients overflowed in {self.overflows_at_floor} steps in a row at "
                            f"the minimum loss scale {floor:g}",
                            advice="Use engine.precision=bf16, a lower lr or train.clip_grad. ")

    def _stop_at_limit(self, in_a_row: int, what: str, advice: str = "") -> None:
        if in_a_row >= self.max_in_a_row:
            raise NonFiniteLossError(f"{what} (train.max_nonfinite={self.max_in_a_row}); stopping. {advice}"
                                     f"The last complete checkpoint is {self.last_checkpoint() or 'none'}")
