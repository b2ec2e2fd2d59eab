"""What becomes of a step that could not be taken.

A non-finite loss (on any rank) skips its step, which is counted; ``max_in_a_row`` of them in a row
stop the run. A step DeepSpeed skipped for an fp16 gradient overflow is counted too; the run stops
once ``max_in_a_row`` in a row overflowed at the minimum loss scale, where lowering the scale can
no longer help. In fp32 and bf16, where there is no scale to lower, ``max_in_a_row`` steps in a row
with non-finite gradients stop it. Every stop names the step and the last complete checkpoint.

Nothing here waits for the device within a step: whether a loss was finite is noted on the device
micro-batch by micro-batch, the ranks agree on skipping a step (and on a stop request) with an
all-reduce whose result stays there, and the engine skips the step on the device. Each step's flags
are kept, as device tensors, until :meth:`StepGuard.settle` reads them all at once (at log steps,
before a save, at the end): it then accounts for every step in order as :meth:`StepGuard.record`
would have after each, so the counts, the log lines and the step a stop names are the same; only
the stop itself comes at the read.
"""

from __future__ import annotations

from typing import Callable

import torch

from pretrain.dist import DistEnv


class NonFiniteLossError(RuntimeError):
    """The run stopped: too many steps in a row could not be taken."""


class StepGuard:
    def __init__(self, max_in_a_row: int, last_checkpoint: Callable[[], str | None],
                 dist: DistEnv | None = None) -> None:
        """``max_in_a_row`` is ``train.max_nonfinite``; ``last_checkpoint()`` names the checkpoint a
        stop message points to; ``dist``: the ranks that agree on each skip (one process by default)."""
        self.max_in_a_row = max_in_a_row
        self.last_checkpoint = last_checkpoint
        self.dist = dist if dist is not None else DistEnv()
        self.nonfinite_steps = 0  # in all (kept in checkpoints)
        self.overflow_steps = 0  # steps DeepSpeed skipped, in all (kept in checkpoints)
        self.nonfinite_in_a_row = 0
        self.overflows_at_floor = 0  # skipped in a row at the minimum fp16 loss scale, or without one
        self.nonfinite = torch.zeros((), device=self.dist.device)  # 1.0 once a loss of this step was not finite here
        # Steps not yet accounted for: (step, [loss not finite, stop asked, gradients not finite]) on the
        # device, and DeepSpeed's host-side overflow verdicts (fp16), by step.
        self._unread: list[tuple[int, torch.Tensor]] = []
        self._overflows: dict[int, tuple] = {}

    # -- within a step ------------------------------------------------------------------------------
    def start_step(self) -> None:
        self.nonfinite = torch.zeros((), device=self.dist.device)

    def finite_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` (detached, fp32) where finite, else 0, so that it cannot poison the logged sums;
        notes a non-finite one without a host sync."""
        loss_ok = torch.isfinite(loss.detach())
        self.nonfinite = torch.maximum(self.nonfinite, (~loss_ok).float())
        return torch.where(loss_ok, loss.detach().float(), 0.0)

    def agree(self, stop_requested: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(skip: 1.0 where some rank's loss was not finite in this step, stop: 1.0 where some rank
        was asked to stop), 0-d device tensors; a collective that nothing waits for here."""
        # torch.full fills on the device; torch.tensor(x, device=...) would copy from the host and wait.
        stop = torch.full((), float(stop_requested), device=self.dist.device)
        flags = torch.stack([self.nonfinite, stop])
        if self.dist.world_size > 1:
            flags = self.dist.all_reduce(flags, "max")
        return flags[0], flags[1]

    def note(self, step: int, skip: torch.Tensor, stop: torch.Tensor, nonfinite_gradients: torch.Tensor | None,
             overflow: tuple[float, float] | tuple[None, None] | None) -> None:
        """Keep ``step``'s verdicts for :meth:`settle`: ``skip`` and ``stop`` from :meth:`agree`,
        ``nonfinite_gradients`` (1.0: the engine skipped it for them, on the device; None where it
        cannot tell) and ``overflow``, DeepSpeed's own verdict on the host (see :meth:`record`)."""
        grads = nonfinite_gradients if nonfinite_gradients is not None else torch.zeros_like(skip)
        self._unread.append((step, torch.stack([skip, stop, grads.to(skip.dtype)])))
        if overflow is not None:
            self._overflows[step] = overflow

    def settle(self, write: Callable[[str], None]) -> bool:
        """Account for the steps noted since the last call, in order (one host read), as
        :meth:`record`; whether some rank asked to stop. NonFiniteLossError stops the run."""
        if not self._unread:
            return False
        steps = [step for step, _ in self._unread]
        flags = torch.stack([f for _, f in self._unread]).tolist()
        overflows, self._unread, self._overflows = self._overflows, [], {}
        stop = False
        for step, (skip, asked, grads) in zip(steps, flags):
            stop = stop or bool(asked)
            overflow = None if skip else overflows.get(step, (None, None) if grads else None)
            self.record(step, bool(skip), overflow, write)
        return stop

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
            write(f"step {step}: non-finite gradients, step skipped "
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
