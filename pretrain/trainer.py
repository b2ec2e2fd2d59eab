"""The one training loop: batch -> objective -> engine -> after_step -> metrics -> checkpoint.

It names no objective. Everything random is seeded from (run seed, rank, step), and every piece of
state (step, data position, weights, optimizer, objective buffers) goes into the checkpoint (its
components are handed to pretrain.state's Checkpointer by name), so a resumed run continues exactly
as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable

import torch

from pretrain import hooks
from pretrain.config import Config
from pretrain.data.loaders import build_train_loader, build_val_loader
from pretrain.data.position import DataPosition
from pretrain.data.prefetch import DeviceBatches
from pretrain.dist import DistEnv, save_on_signals
from pretrain.engine import Engine, build_module, describe_precision, resolve_autocast
from pretrain.evaluator import Evaluator
from pretrain.export import export_backbone
from pretrain.metrics import Metrics, memory_gib
from pretrain.metrics_window import MetricsWindow
from pretrain.models.backbone import backbone_kwargs
from pretrain.objectives.base import Objective, RunContext
from pretrain.objectives.build import build_objective
from pretrain.plan import make_plan, resolve_sources
from pretrain.run_summary import RunSummary, run_state
from pretrain.state.checkpointer import Checkpointer, checkpoint_precision
from pretrain.step_guard import StepGuard
from pretrain.train_step import StepTaken, TrainStep
from pretrain.zero_stage import resolve_zero_stage

log = logging.getLogger(__name__)


class Trainer:
    # Under ZeRO-3 the objective is built partitioned (engine.build_module); a stage whose objective
    # needs its whole weights while it is built (loading pre-trained ones) turns this off.
    build_partitioned = True

    def __init__(self, cfg: Config, dist: DistEnv,
                 make_objective: Callable[[Config, RunContext], Objective] = build_objective) -> None:
        """``make_objective`` builds the objective (later stages pass one that loads initial weights)."""
        self.cfg, self.dist = cfg, dist
        self.run_dir = Path(cfg.run.dir)
        train_set, val_set = resolve_sources(cfg)
        self.plan = make_plan(cfg, dist.world_size, train_set)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        ctx = RunContext(self.plan.num_classes, self.plan.total_steps, self.plan.steps_per_epoch, dist,
                         cfg.engine.precision)
        # engine.zero_stage=auto becomes a stage here, before anything builds on it (pretrain.zero_stage);
        # then engine.autocast=auto, which follows the stage and the checkpoint's mode.
        cfg, self.zero_stage_choice = resolve_zero_stage(cfg, dist, ctx)
        cfg = self.cfg = resolve_autocast(cfg, checkpoint_precision(cfg))
        ctx = dataclasses.replace(ctx, autocast=cfg.engine.autocast)
        build = lambda: make_objective(cfg, ctx)  # noqa: E731
        self.objective = (build_module(build, cfg, dist) if self.build_partitioned else build()).to(dist.device)
        self.engine = Engine(self.objective, self.objective.param_groups(), cfg, dist)
        self.train_loader = build_train_loader(cfg, train_set, self.objective.train_view(), dist, self.plan.num_classes)
        self.data_position = DataPosition(self.train_loader, dist)
        val_loader = build_val_loader(cfg, val_set, self.objective.eval_view(), dist)
        self.evaluator = Evaluator(self.objective, self.engine, val_loader, dist, cfg.train.eval_every,
                                   cfg.data.image_size)
        self.step = 0
        self._end = self.plan.total_steps  # where this invocation stops (fit: train.stop_at too)
        # Its stop message names the last checkpoint: the checkpointer's, built below with the guard in it.
        self.guard = StepGuard(cfg.train.max_nonfinite, lambda: self.checkpointer.latest(), dist)
        self.stop_requested = False  # set from a signal handler; acted on at the next step boundary
        self.stopped_on_request = False  # saved and stopped before the end of this invocation
        self.window = MetricsWindow(dist, self.plan.global_batch, cfg.train.log_every, self.plan.total_steps)
        self.train_step = TrainStep(cfg, self.plan, dist, self.engine, self.guard, self.window)
        # What a resumed run needs besides the engine's state, by the names checkpoints keep it under.
        self.checkpointer = Checkpointer(cfg, self.plan, dist, self.engine, {
            "trainer": self, "step_guard": self.guard, "log_window": self.window, "data": self.data_position})
        self.summary = RunSummary(self.run_dir, self.plan, dist, self.zero_stage_choice)
        self.step_times: list[float] = []  # perf_counter at the end of each step (benchmarks read it)

    # -- its own state: the step (the run's other state is its components', see pretrain.state) -------
    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]

    def reshard(self, state: dict, saved_world_size: int) -> dict:
        """Unchanged: the step counts optimizer steps, whatever the number of processes."""
        return state

    def request_stop(self) -> None:
        """Save and stop at the next step boundary (safe to call from a signal handler)."""
        self.stop_requested = True

    def stop_on_signal(self) -> None:
        """Make the save signals (SIGUSR1, a first SIGTERM: pretrain.dist.save_on_signals) ask for a
        checkpoint and a clean stop at the next step boundary (all ranks agree on it there); launchers
        send them before a time limit or a preemption, and a stop of every process sends SIGTERM."""
        save_on_signals(self.request_stop)

    def resume(self) -> str | None:
        """Take up the run's last checkpoint, verified before anything is loaded; its tag, or None."""
        return self.checkpointer.resume()

    def save(self) -> str:
        return self.checkpointer.save(self.step)

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train from the last checkpoint (if any) to ``train.steps`` or ``train.stop_at``, or until a
        stop request; returns the final validation metrics (empty when it stopped early)."""
        resumed = self.resume()
        end = self._end = min(self.plan.total_steps, self.cfg.train.stop_at or self.plan.total_steps)
        metrics = self._start_run(resumed)
        # Copied (and decoded) to the device ahead of the step that needs them.
        batches = DeviceBatches(self.train_loader, self.dist.device)
        self.data_position.follow(batches)
        final: dict = {}
        try:
            while self.step < end:
                stop = self._step(batches, metrics)
                if self.evaluator.due(self.step, end):
                    metrics.log(self.step, self.evaluate())
                if self.checkpointer.due(self.step, stop_requested=stop):
                    self.save()
                if stop and self.step < end:
                    self.stopped_on_request = True
                    metrics.write(f"stopped on request at step {self.step}; checkpoint saved")
                    break
            if not self.stopped_on_request:
                final = self._finish(metrics)
        finally:
            batches.close()
            metrics.close()
        self.summary.end(self.state, self.step, final, self.guard, batches.skipped)
        return final

    def _start_run(self, resumed: str | None) -> Metrics:
        resized = self.checkpointer.resized
        self.summary.start(self.cfg, resumed, self.step, resized)
        metrics = Metrics(self.run_dir, self.dist, self.step, self.plan.total_steps, self.cfg.train.progress)
        metrics.write(f"precision: {describe_precision(self.cfg.engine)}")
        if resumed:
            metrics.write(f"resumed from {self.checkpointer.directory / resumed} at step {self.step}")
        if resized:
            metrics.write(resized["message"])
        return metrics

    def _step(self, batches: DeviceBatches, metrics: Metrics) -> bool:
        """One training step, accounted for and logged; whether the ranks agreed to stop after it.
        Only a step that logs, saves or ends the run reads anything on the host (the guard settles)."""
        step = self.step
        hooks.fire("step", rank=self.dist.rank, step=step)
        log_now = self.window.logs_after(step)
        taken = self.train_step(step, batches, self.stop_requested, measure_grad_norm=log_now)
        self.guard.note(step, taken.skipped, taken.stop, self.engine.nonfinite_gradients, self.engine.fp16_overflow())
        self.objective.after_step(step, self.engine)
        self.step = step + 1
        self.step_times.append(time.perf_counter())
        self.window.steps += 1
        stop = False
        if log_now or self.checkpointer.due(self.step) or self.step >= self._end:
            stop = self.guard.settle(metrics.write)
        if log_now:
            self._log(metrics, batches, taken)
        return stop

    def _log(self, metrics: Metrics, batches: DeviceBatches, taken: StepTaken) -> None:
        """The window's metrics with this step's own (collectives)."""
        extra = {"train/lr": taken.lr, "train/weight_decay": taken.weight_decay,
                 "train/memory_gib": memory_gib(self.dist.device), **self.guard.log_values()}
        if taken.grad_norm is not None:
            extra["train/grad_norm"] = taken.grad_norm
        extra.update({f"data/skipped_{k}": float(v) for k, v in self.dist.sum_counts(batches.skipped).items()})
        self.window.log(metrics, self.step, extra)

    def _finish(self, metrics: Metrics) -> dict:
        """The end of an invocation that was not stopped: validation, the last save, the export."""
        final = self.evaluate()
        if final:
            metrics.log(self.step, final)
            metrics.write("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
        if self.checkpointer.due(self.step, last=True):
            self.save()
        if self.cfg.train.export and self.step == self.plan.total_steps:
            self.export()
        return final

    @property
    def state(self) -> str:
        """How this invocation ended (pretrain.run_summary.run_state)."""
        return run_state(self.step, self.plan.total_steps, self.stopped_on_request)

    # -- evaluation and export ----------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """The validation metrics now (a stage may act on them: finetune keeps its best weights)."""
        return self.evaluator.evaluate()

    def export(self, directory: Path | None = None, extra: dict | None = None) -> Path | None:
        """The backbone's fp32 master weights in timm's format, into ``directory`` (``RUN_DIR/export``)
        with ``extra`` in its backbone.json (a collective; rank 0 writes)."""
        backbone = self.objective.backbone()
        state = self.objective.backbone_state_dict(self.engine, main_only=True)  # rank 0 writes it
        path = None
        if self.dist.is_main:
            # A backbone without a classifier (self-supervised) is exported as one.
            num_classes = getattr(backbone, "num_classes", self.plan.num_classes)
            kwargs = backbone_kwargs(self.cfg.model, self.cfg.data.image_size, num_classes)
            path = export_backbone(state, directory or self.run_dir / "export", self.cfg.model.name, kwargs,
                                   extra={"step": self.step, "objective": self.cfg.objective.name, **(extra or {})})
        self.dist.barrier()
        return path
