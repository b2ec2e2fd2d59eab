"""What becomes of a step that could not be taken.

A non-finite loss (on any rank) skips its step, which is counted; ``max_in_a_row`` of them in a row
stop the run. A step DeepSpeed skipped for an fp16 gradient overflow is counted too; the run stops
once ``max_in_a_row`` in a row overflowed at the minimum loss scale, where lowering the scale can
no longer help. In fp32 and bf16, where DeepSpeed skips steps with non-finite gradients and has no
scale to lower, ``max_in_a_row`` such steps in a row stop it. Every stop names the step and the last
complete checkpoint.

Whether a loss was finite is noted on the device, micro-batch by micro-batch, and the ranks agree on
skipping a step in the step's single host sync (which carries the stop requests too).
"""

from __future__ import annotations

from typing import Callable

import torch

from pretrain.dist import DistEnv


class NonFiniteLossError(RuntimeError):
    """The run stopped: too many steps in a row could not be taken."""


class StepGuard:
    def __init__(self, max_in_a_row: int, last_checkpoint: Callable[[], str | None],
                 dist: DistEnv = DistEnv()) -> None:
        """``max_in_a_row`` is ``train.max_nonfinite``; ``last_checkpoint()`` names the checkpoint a
        stop message points to; ``dist``: the ranks that agree on each skip."""
        self.max_in_a_row = max_in_a_row
        self.last_checkpoint = last_checkpoint
        self.dist = dist
        self.nonfinite_steps = 0  # in all (kept in checkpoints)
        self.overflow_steps = 0  # steps DeepSpeed skipped, in all (kept in checkpoints)
        self.nonfinite_in_a_row = 0
        self.overflows_at_floor = 0  # skipped in a row at the minimum fp16 loss scale, or without one
        self.nonfinite = torch.zeros((), device=dist.device)  # 1.0 once a loss of this step was not finite here

    # -- within a step ------------------------------------------------------------------------------
    def start_step(self) -> None:
        self.nonfinite = torch.zeros((), device=self.dist.device)

    def finite_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` (detached, fp32) where finite, else 0, so that it cannot poison the logged sums;
        notes a non-finite one without a host sync."""
        loss_ok = torch.isfinite(loss.detach())
        self.nonfinite = torch.maximum(self.nonfinite, (~loss_ok).float())
        return torch.where(loss_ok, loss.detach().float(), 0.0)

    def agree(self, stop_requested: bool) -> tuple[bool, bool]:
        """(skip: some rank's loss was not finite in this step, stop: some rank was asked to stop);
        a collective, and the step's single host sync (the one place that waits for the device)."""
        stop_flag = torch.tensor(float(stop_requested), device=self.dist.device)
        skip, stop = (bool(f) for f in self.dist.all_reduce(torch.stack([self.nonfinite, stop_flag]), "max").tolist())
        return skip, stop

    # -- after a step -------------------------------------------------------------------------------
    def record(self, step: int, nonfinite: bool, overflow: tuple[float, float] | tuple[None, None] | None,
               write: Callable[[str], None]) -> None:
        """Account for ``step``: ``nonfinite`` when its loss was not finite on some rank (it was
        skipped), else ``overflow`` when DeepSpeed skipped it for non-finite gradients: (loss scale
        now, minimum) in fp16, (None, None) where there is no loss scale (fp32, bf16). ``write`` logs
        a line; NonFiniteLossError stops the run."""
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
        if scale is None:  # nothing to lower: every such step counts towards the stop
            self.overflows_at_floor += 1
            write(f"step {step}: non-finite gradients, step skipped by DeepSpeed "
                  f"({self.overflow_steps} such steps in all)")
            self._stop_at_limit(self.overflows_at_floor,
                                f"step {step}: the gradients were not finite in {self.overflows_at_floor} steps in "
                                f"a row", advice="Use a lower lr or train.clip_grad. ")
            return
        self.overflows_at_floor = self.overflows_at_floor + 1 if scale <= floor else 0
        write(f"step {step}: fp16 gradient overflow, step skipped (loss scale now {scale:g}, "
              f"{self.overflow_steps} overflows in all)")
        self._stop_at_limit(self.overflows_at_floor,
                            f"step {step}: fp16 gradients overflowed in {self.overflows_at_floor} steps in a row at "
                            f"the minimum loss scale {floor:g}",
                            advice="Use engine.precision=bf16, a lower lr or train.clip_grad. ")

    def log_values(self) -> dict[str, float]:
        # Steps DeepSpeed skipped for non-finite gradients, in any precision (its name predates that).
        return {"train/nonfinite_steps": float(self.nonfinite_steps),
                "train/fp16_overflow_steps": float(self.overflow_steps)}

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The counts in all (the same on every rank); the counts in a row start again on resume."""
        return {"nonfinite_steps": self.nonfinite_steps, "overflow_steps": self.overflow_steps}

    def reshard(self, state: dict, saved_world_size: int) -> dict:
        """The counts are the whole run's, whatever its number of processes: unchanged."""
        return state

    def load_state_dict(self, state: dict) -> None:
        self.nonfinite_steps = state["nonfinite_steps"]
        self.overflow_steps = state.get("overflow_steps", 0)  # absent from older checkpoints

    def _stop_at_limit(self, in_a_row: int, what: str, advice: str = "") -> None:
        if in_a_row >= self.max_in_a_row:
            raise NonFiniteLossError(f"{what} (train.max_nonfinite={self.max_in_a_row}); stopping. {advice}"
                                     f"The last complete checkpoint is {self.last_checkpoint() or 'none'}")
