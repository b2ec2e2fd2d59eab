"""The one training loop: batch -> objective -> engine -> after_step -> metrics -> checkpoint.

It names no objective. Everything random is seeded from (run seed, rank, step), and every piece of
state (step, data position, weights, optimizer, objective buffers) goes into the checkpoint, so a
resumed run continues exactly as if it had never stopped.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch

from pretrain import hooks
from pretrain.checkpoint import CheckpointError, Checkpoints, checkpoint_identity
from pretrain.config import Config
from pretrain.data.loaders import build_train_loader, build_val_loader
from pretrain.data.prefetch import DeviceBatches
from pretrain.dist import DistEnv, save_on_signals
from pretrain.engine import Engine, build_module, partitioned_shape
from pretrain.evaluator import Evaluator
from pretrain.export import export_backbone
from pretrain.metrics import Metrics, memory_gib
from pretrain.metrics_window import MetricsWindow
from pretrain.models.backbone import backbone_kwargs
from pretrain.objectives.base import Objective, RunContext
from pretrain.objectives.build import build_objective
from pretrain.plan import make_plan, resolve_sources
from pretrain.run_summary import RunSummary, resize_note, run_state
from pretrain.step_guard import StepGuard
from pretrain.train_step import StepTaken, TrainStep

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
        build = lambda: make_objective(cfg, ctx)  # noqa: E731
        self.objective = (build_module(build, cfg, dist) if self.build_partitioned else build()).to(dist.device)
        self.engine = Engine(self.objective, self.objective.param_groups(), cfg, dist)
        self.train_loader = build_train_loader(cfg, train_set, self.objective.train_view(), dist, self.plan.num_classes)
        self.batches: DeviceBatches | None = None  # the training batches on the device, while fit() runs
        val_loader = build_val_loader(cfg, val_set, self.objective.eval_view(), dist)
        self.evaluator = Evaluator(self.objective, self.engine, val_loader, dist, cfg.train.eval_every,
                                   cfg.data.image_size)
        self.checkpoints = Checkpoints(self.run_dir, cfg.train.keep_last, dist, every=cfg.train.ckpt_every)
        self.step = 0
        self.guard = StepGuard(cfg.train.max_nonfinite, self.checkpoints.latest, dist)
        self.stop_requested = False  # set from a signal handler; acted on at the next step boundary
        self.stopped_on_request = False  # saved and stopped before the end of this invocation
        self.window = MetricsWindow(dist, self.plan.global_batch, cfg.train.log_every, self.plan.total_steps)
        self.train_step = TrainStep(cfg, self.plan, dist, self.engine, self.guard, self.window)
        self.summary = RunSummary(self.run_dir, self.plan, dist)
        self.resized: dict | None = None  # set by resume() when the run continues on another world size
        self.step_times: list[float] = []  # perf_counter at the end of each step (benchmarks read it)

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly; a collective: the partial logging window
        is averaged over the ranks (the first log line after a resume is the uninterrupted run's), and
        the data position of every rank goes into every rank's copy, so that a run on any number of
        processes can take it up (DeepSpeed keeps rank 0's copy below ZeRO-3)."""
        data = dict((self.batches or self.train_loader).state_dict())
        plan = data.pop("plan", None)  # the same on every rank: kept once
        ranks = self.dist.gather_objects(data)
        return {"trainer": {"step": self.step, **self.guard.state_dict(), "world_size": self.dist.world_size,
                            "global_batch": self.plan.global_batch, "log_window": self.window.state_dict()},
                "data": {"ranks": ranks, "plan": plan}}

    def load_state_dict(self, state: dict) -> None:
        trainer, data = state["trainer"], state["data"]
        saved_world = trainer["world_size"]
        self.step = trainer["step"]
        self.guard.load_state_dict(self.guard.reshard(trainer, saved_world))  # its keys sit in the trainer's
        if "log_window" in trainer:
            self.window.load_state_dict(self.window.reshard(trainer["log_window"], saved_world))
        if "ranks" not in data:  # written before every rank's position was kept
            if saved_world != self.dist.world_size:
                raise CheckpointError(f"the checkpoint was written by {saved_world} processes by an older vitscale, "
                                      f"which kept one rank's data position: resume it on {saved_world} processes")
            self.train_loader.load_state_dict(data)
            return
        ranks = [{**state, "plan": data.get("plan")} for state in data["ranks"]]
        if len(ranks) == self.dist.world_size and ranks[0]["workers"] == self.train_loader.workers:
            self.train_loader.load_state_dict(ranks[self.dist.rank])
            return
        try:
            self.train_loader.resume_elsewhere(ranks)
        except ValueError as e:
            raise CheckpointError(f"resuming on {self.dist.world_size} processes x {self.train_loader.workers} "
                                  f"data workers: {e}") from None

    def request_stop(self) -> None:
        """Save and stop at the next step boundary (safe to call from a signal handler)."""
        self.stop_requested = True

    def stop_on_signal(self) -> None:
        """Make the save signals (SIGUSR1, a first SIGTERM: pretrain.dist.save_on_signals) ask for a
        checkpoint and a clean stop at the next step boundary (all ranks agree on it there); launchers
        send them before a time limit or a preemption, and a stop of every process sends SIGTERM."""
        save_on_signals(self.request_stop)

    def resume(self) -> str | None:
        if not self.cfg.train.resume:
            return None
        # Verified (meta data, every file's checksum) before anything is loaded.
        tag = self.checkpoints.resumable(self.checkpoint_meta(), fallback=self.cfg.train.resume_from)
        if tag is not None:
            saved = self.checkpoints.meta(tag)
            self.resized = resize_note(saved, self.dist.world_size, self.plan)
            self.load_state_dict(self.engine.load(str(self.checkpoints.directory), tag, saved.get("world_size")))
            self.checkpoints.saved_step = self.step
        return tag

    def save(self) -> str:
        return self.checkpoints.save(self.engine, self.step, self.state_dict(), self.checkpoint_meta())

    def checkpoint_meta(self) -> dict:
        """What a checkpoint must match to be resumed by this run (see Checkpoints.verify)."""
        shapes = {name: list(partitioned_shape(p))
                  for name, p in self.objective.named_parameters()}
        return {**checkpoint_identity(self.cfg, shapes), "world_size": self.dist.world_size,
                "data_workers": self.cfg.data.workers, "global_batch": self.plan.global_batch,
                "peak_lr": self.plan.peak_lr, "total_steps": self.plan.total_steps}

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train from the last checkpoint (if any) to ``train.steps`` or ``train.stop_at``, or until a
        stop request; returns the final validation metrics (empty when it stopped early)."""
        resumed = self.resume()
        end = min(self.plan.total_steps, self.cfg.train.stop_at or self.plan.total_steps)
        metrics = self._start_run(resumed)
        # Copied (and decoded) to the device ahead of the step that needs them.
        batches = self.batches = DeviceBatches(self.train_loader, self.dist.device)
        final: dict = {}
        try:
            while self.step < end:
                stop = self._step(batches, metrics)
                if self.evaluator.due(self.step, end):
                    metrics.log(self.step, self.evaluate())
                if self.checkpoints.due(self.step, stop_requested=stop):
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
        self.summary.start(self.cfg, resumed, self.step, self.resized)
        metrics = Metrics(self.run_dir, self.dist, self.step, self.plan.total_steps, self.cfg.train.progress)
        if resumed:
            metrics.write(f"resumed from {self.checkpoints.directory / resumed} at step {self.step}")
        if self.resized:
            metrics.write(self.resized["message"])
        return metrics

    def _step(self, batches: DeviceBatches, metrics: Metrics) -> bool:
        """One training step, accounted for and logged; whether the ranks agreed to stop after it."""
        step = self.step
        hooks.fire("step", rank=self.dist.rank, step=step)
        log_now = self.window.logs_after(step)
        taken = self.train_step(step, batches, self.stop_requested, measure_grad_norm=log_now)
        self.guard.record(step, taken.skipped, None if taken.skipped else self.engine.fp16_overflow(), metrics.write)
        if not taken.skipped:
            self.objective.after_step(step, self.engine)
        self.step = step + 1
        self.step_times.append(time.perf_counter())
        self.window.steps += 1
        if log_now:
            self._log(metrics, batches, taken)
        return taken.stop

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
        if self.checkpoints.due(self.step, last=True):
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
