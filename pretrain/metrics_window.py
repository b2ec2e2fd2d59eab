"""The training metrics since the last log line: which steps log, their sums, and the log line.

The sums stay on the device until a log step. A window cut by the end of an invocation goes into the
checkpoint, so the resumed run logs it whole, with the numbers of a run that never stopped.
"""

from __future__ import annotations

import time

import torch

from pretrain.dist import DistEnv
from pretrain.metrics import Metrics


class MetricsWindow:
    def __init__(self, dist: DistEnv, global_batch: int, log_every: int, total_steps: int) -> None:
        """``log_every`` is ``train.log_every``; ``total_steps`` the run's (its last step logs too)."""
        self.dist, self.global_batch = dist, global_batch
        self.log_every, self.total_steps = log_every, total_steps
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.dist.device)  # summed over this rank's micro-batches
        self.values: dict[str, torch.Tensor] = {}
        self.micro = 0
        self.steps = 0
        self.data_time = 0.0
        self.started = time.perf_counter()

    def logs_after(self, step: int) -> bool:
        """Whether step ``step`` (counted from 0) ends a window: whole windows only, and the run's
        last step, wherever an invocation ends (a cut window is logged by the resumed run)."""
        return (step + 1) % self.log_every == 0 or step + 1 == self.total_steps

    def add(self, loss: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """One micro-batch's loss (0 where it was not finite) and the objective's values."""
        self.loss += loss
        for key, value in values.items():
            self.values[key] = self.values.get(key, 0.0) + value.detach().float()
        self.micro += 1

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The sums so far, averaged over the ranks (a collective): every rank restores the same
        share, and the ranks' sum at the next flush is the uninterrupted run's. Time is not carried:
        throughput counts the steps since the resume."""
        keys = sorted(self.values)
        stacked = torch.stack([self.loss, *[self.values[k] for k in keys]]).float()
        self.dist.all_reduce(stacked)
        stacked = (stacked / self.dist.world_size).tolist()
        return {"loss": stacked[0], "values": dict(zip(keys, stacked[1:])), "micro": self.micro}

    def reshard(self, state: dict, saved_world_size: int) -> dict:
        """What this rank loads of a window saved by ``saved_world_size`` processes: the same, since
        the saved sums are already one rank's share of the average."""
        return state

    def load_state_dict(self, state: dict) -> None:
        self.loss = torch.tensor(state["loss"], dtype=torch.float32, device=self.dist.device)
        self.values = {k: torch.tensor(v, dtype=torch.float32, device=self.dist.device)
                       for k, v in state["values"].items()}
        self.micro = state["micro"]

    # -- the log line -------------------------------------------------------------------------------
    def flush(self) -> tuple[int, dict[str, float]]:
        """(steps in the window, rank-averaged metrics with throughput and data-wait share); resets.
        A collective."""
        keys = sorted(self.values)
        stacked = torch.stack([self.loss, *[self.values[k] for k in keys]]) / max(self.micro, 1)
        self.dist.all_reduce(stacked)
        stacked /= self.dist.world_size
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        out = {"train/loss": stacked[0].item(), **{f"train/{k}": stacked[i + 1].item() for i, k in enumerate(keys)},
               "train/images_per_s": self.steps * self.global_batch / elapsed,
               "train/data_wait": self.data_time / elapsed}
        steps = self.steps
        self.reset()
        return steps, out

    def log(self, metrics: Metrics, step: int, extra: dict[str, float]) -> None:
        """The window's metrics and ``extra`` (which has ``train/lr``) at ``step``, to TensorBoard, the
        log file and the progress bar; a collective."""
        steps_in_window, values = self.flush()
        values.update(extra)
        metrics.log(step, values)
        metrics.progress(steps_in_window, loss=f"{values['train/loss']:.4f}", lr=f"{values['train/lr']:.2e}",
                         img_s=f"{values['train/images_per_s']:.0f}")
