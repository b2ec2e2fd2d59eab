"""One optimizer step over ``train.grad_accum`` micro-batches: its scheduled hyperparameters, its
seeds, its micro-batches, and the optimizer step at its boundary, which the step guard may skip."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from pretrain import hooks
from pretrain.config import Config
from pretrain.dist import DistEnv
from pretrain.metrics_window import MetricsWindow
from pretrain.plan import Plan
from pretrain.schedules import cosine, group_lr, warmup_cosine
from pretrain.step_guard import StepGuard


@dataclass(frozen=True)
class StepTaken:
    # 0-d device tensors, read by the step guard at its next settling (no host sync within a step):
    skipped: torch.Tensor  # 1.0: a loss was not finite on some rank, the optimizer did not step
    stop: torch.Tensor  # 1.0: some rank was asked to stop, all save and stop
    lr: float
    weight_decay: float
    grad_norm: float | None  # when asked for, where the engine can tell it


class TrainStep:
    def __init__(self, cfg: Config, plan: Plan, dist: DistEnv, engine, guard: StepGuard,
                 window: MetricsWindow) -> None:
        self.cfg, self.plan, self.dist = cfg, plan, dist
        self.engine, self.guard, self.window = engine, guard, window

    def __call__(self, step: int, batches: Iterator[dict], stop_requested: bool,
                 measure_grad_norm: bool) -> StepTaken:
        """Optimizer step ``step`` on the next ``train.grad_accum`` batches; ``stop_requested``: this
        rank was asked to stop (the ranks agree on it with the skip, on the device)."""
        lr, wd = self.hyperparameters(step)
        self.engine.set_hyperparameters(lr, wd, step, self.lr_of_scale(step))
        self.engine.train()
        self.guard.start_step()
        accum = self.cfg.train.grad_accum
        for micro in range(accum):
            waited = time.perf_counter()
            batch = next(batches)
            self.window.data_time += time.perf_counter() - waited
            # Seeded after the fetch: the first fetch starts the loader's workers, which draws from
            # torch's RNG, and a resumed run makes it at another step.
            self._seed_micro_step(step, micro)
            loss, values = self.engine.forward(batch, step)
            hooks.fire("loss", rank=self.dist.rank, step=step, micro=micro, loss=loss)
            self.window.add(self.guard.finite_loss(loss), values)
            self.engine.backward(loss)
            if micro < accum - 1:
                self.engine.step()
        skip, stop = self.guard.agree(stop_requested)
        return StepTaken(skip, stop, lr, wd, self.engine.step(skip=skip, measure_grad_norm=measure_grad_norm))

    def hyperparameters(self, step: int) -> tuple[float, float]:
        o, p = self.cfg.optim, self.plan
        lr = warmup_cosine(step, p.total_steps, p.peak_lr, p.min_lr, p.warmup_steps)
        wd = o.weight_decay if o.weight_decay_end is None else \
            cosine(step, p.total_steps, o.weight_decay, o.weight_decay_end)
        return lr, wd

    def lr_of_scale(self, step: int):
        """Each layer-decay group's lr at ``step`` as a function of its lr_scale, when groups end at
        a shared floor (optim.lr_floor); None: the scheduled lr times each group's scale."""
        p = self.plan
        if self.cfg.optim.lr_floor != "shared":
            return None
        return lambda scale: group_lr(step, p.total_steps, p.peak_lr, p.min_lr, p.warmup_steps, scale, "shared")

    def _seed_micro_step(self, step: int, micro: int) -> None:
        """Seed the model-side randomness (drop path, Mixup) from (seed, rank, step, micro-step) alone,
        so it does not depend on what the data pipeline drew, nor on where a run was resumed."""
        seed = int(np.random.SeedSequence([self.cfg.run.seed, self.dist.rank, step, micro]).generate_state(1)[0])
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

