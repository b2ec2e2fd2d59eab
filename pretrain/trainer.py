"""The one training loop: batch -> objective -> engine -> after_step -> metrics -> checkpoint.

It names no objective. Everything random is seeded from (run seed, rank, step), and every piece of
state (step, data position, weights, optimizer, objective buffers) goes into the checkpoint, so a
resumed run continues exactly as if it had never stopped.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data._utils.collate import default_collate

from pretrain import hooks
from pretrain.checkpoint import CheckpointError, Checkpoints, checkpoint_identity
from pretrain.config import Config, save_config
from pretrain.data.loaders import build_train_loader, build_val_loader
from pretrain.data.prefetch import DeviceBatches
from pretrain.dist import DistEnv, save_on_signals
from pretrain.engine import Engine, build_module, partitioned_shape
from pretrain.export import export_backbone
from pretrain.files import atomic_write
from pretrain.metrics import Metrics, memory_gib
from pretrain.models.backbone import backbone_kwargs
from pretrain.objectives.base import Objective, RunContext, build_objective
from pretrain.plan import Plan, make_plan, resolve_sources
from pretrain.schedules import cosine, group_lr, warmup_cosine
from pretrain.step_guard import StepGuard

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
        self.val_loader = build_val_loader(cfg, val_set, self.objective.eval_view(), dist)
        self.checkpoints = Checkpoints(self.run_dir, cfg.train.keep_last, dist, every=cfg.train.ckpt_every)
        self.step = 0
        self.guard = StepGuard(cfg.train.max_nonfinite, self.checkpoints.latest)
        self.stop_requested = False  # set from a signal handler; acted on at the next step boundary
        self.stopped_on_request = False  # saved and stopped before the end of this invocation
        self.window = _Window(dist.device)  # the loss and metrics since the last log line
        self.resized: dict | None = None  # set by resume() when the run continues on another world size
        self.step_times: list[float] = []  # perf_counter at the end of each step (benchmarks read it)

    # -- data ---------------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.dist.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items() if not k.startswith("__")}

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly; a collective: the partial logging window
        is averaged over the ranks (the first log line after a resume is the uninterrupted run's), and
        the data position of every rank goes into every rank's copy, so that a run on any number of
        processes can take it up (DeepSpeed keeps rank 0's copy below ZeRO-3)."""
        data = dict((self.batches or self.train_loader).state_dict())
        plan = data.pop("plan", None)  # the same on every rank: kept once
        ranks = self.dist.gather_objects(data)
        return {"trainer": {"step": self.step, "nonfinite_steps": self.guard.nonfinite_steps,
                            "overflow_steps": self.guard.overflow_steps, "world_size": self.dist.world_size,
                            "global_batch": self.plan.global_batch, "log_window": self.window.state_dict(self.dist)},
                "data": {"ranks": ranks, "plan": plan}}

    def load_state_dict(self, state: dict) -> None:
        trainer, data = state["trainer"], state["data"]
        saved_world = trainer["world_size"]
        self.step = trainer["step"]
        self.guard.nonfinite_steps = trainer["nonfinite_steps"]
        self.guard.overflow_steps = trainer.get("overflow_steps", 0)
        if "log_window" in trainer:
            self.window.load_state_dict(trainer["log_window"])
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
    def _seed_micro_step(self, step: int, micro: int) -> None:
        """Seed the model-side randomness (drop path, Mixup) from (seed, rank, step, micro-step) alone,
        so it does not depend on what the data pipeline drew, nor on where a run was resumed."""
        seed = int(np.random.SeedSequence([self.cfg.run.seed, self.dist.rank, step, micro]).generate_state(1)[0])
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

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
                if self._evaluation_due(end):
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
        self._end_run(resumed, final, batches)
        return final

    def _start_run(self, resumed: str | None) -> Metrics:
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            self._write_summary({"resumed_from": resumed, "state": "running", "step": self.step,
                                 **self._resize_summary()})
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
        lr, wd = self.hyperparameters(step)
        self.engine.set_hyperparameters(lr, wd, step, self.lr_of_scale(step))
        self.engine.train()
        # Whole windows only (and the run's last step): a window cut by the end of this invocation
        # goes into the checkpoint and is logged, whole, by the resumed run.
        log_now = (step + 1) % self.cfg.train.log_every == 0 or step + 1 == self.plan.total_steps
        skip, stop, grad_norm = self._train_step(step, batches, self.window, want_grad_norm=log_now)
        self.guard.record(step, skip, None if skip else self.engine.fp16_overflow(), metrics.write)
        if not skip:
            self.objective.after_step(step, self.engine)
        self.step = step + 1
        self.step_times.append(time.perf_counter())
        self.window.steps += 1
        if log_now:
            self._log(metrics, batches, lr, wd, grad_norm)
        return stop

    def _evaluation_due(self, end: int) -> bool:
        """Every ``train.eval_every`` steps before the end (the end evaluates anyway, in _finish)."""
        every = self.cfg.train.eval_every
        return bool(every) and self.step % every == 0 and self.step < end

    def _log(self, metrics: Metrics, batches: DeviceBatches, lr: float, wd: float, grad_norm: float | None) -> None:
        """The window's metrics (a collective), to TensorBoard, the log file and the progress bar."""
        steps_in_window, values = self.window.flush(self.dist, self.plan.global_batch)
        values.update({"train/lr": lr, "train/weight_decay": wd, "train/memory_gib": memory_gib(self.dist.device),
                       "train/nonfinite_steps": float(self.guard.nonfinite_steps)})
        # Steps DeepSpeed skipped for non-finite gradients, in any precision (its name predates that).
        values["train/fp16_overflow_steps"] = float(self.guard.overflow_steps)
        grad_norm = self.engine.grad_norm() if grad_norm is None else grad_norm
        if grad_norm is not None:
            values["train/grad_norm"] = grad_norm
        values.update({f"data/skipped_{k}": float(v) for k, v in self.dist.sum_counts(batches.skipped).items()})
        metrics.log(self.step, values)
        metrics.progress(steps_in_window, loss=f"{values['train/loss']:.4f}", lr=f"{lr:.2e}",
                         img_s=f"{values['train/images_per_s']:.0f}")

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

    def _end_run(self, resumed: str | None, final: dict, batches: DeviceBatches) -> None:
        skipped = self.dist.sum_counts(batches.skipped)  # a collective: before the rank-0 branch
        if self.dist.is_main:
            self._write_summary({"resumed_from": resumed, "state": self.state, **self._resize_summary(),
                                 "step": self.step, "final": final, "nonfinite_steps": self.guard.nonfinite_steps,
                                 "fp16_overflow_steps": self.guard.overflow_steps, "skipped_samples": skipped})

    @property
    def state(self) -> str:
        """How this invocation ended, as ``run.json`` records it: ``finished`` (train.steps reached),
        ``stopped`` (saved and stopped on a signal before that; the process exits with
        STOPPED_EXIT_CODE), or ``stop_at`` (ended at train.stop_at, as asked)."""
        if self.step >= self.plan.total_steps:
            return "finished"
        return "stopped" if self.stopped_on_request else "stop_at"

    def _train_step(self, step: int, batches, window: "_Window", want_grad_norm: bool):
        """One optimizer step over ``train.grad_accum`` micro-batches.

        Returns (skipped, stop requested, grad norm measured here or None). Non-finite losses are
        detected on the device and agreed on across ranks in the step's single host sync.
        """
        dist = self.dist
        nonfinite = torch.zeros((), device=dist.device)
        accum = self.cfg.train.grad_accum
        grad_norm = None
        for micro in range(accum):
            waited = time.perf_counter()
            batch = next(batches)
            window.data_time += time.perf_counter() - waited
            # Seeded after the fetch: the first fetch starts the loader's workers, which draws from
            # torch's RNG, and a resumed run makes it at another step.
            self._seed_micro_step(step, micro)
            loss, values = self.engine.forward(batch, step)
            hooks.fire("loss", rank=dist.rank, step=step, micro=micro, loss=loss)
            loss_ok = torch.isfinite(loss.detach())
            nonfinite = torch.maximum(nonfinite, (~loss_ok).float())
            window.add(torch.where(loss_ok, loss.detach().float(), 0.0), values)
            self.engine.backward(loss)
            if micro < accum - 1:
                self.engine.step()
        if want_grad_norm and not self.engine.tracks_grad_norm:
            grad_norm = self.engine.local_grad_norm()
        stop_flag = torch.tensor(float(self.stop_requested), device=dist.device)
        skip, stop = (bool(f) for f in dist.all_reduce(torch.stack([nonfinite, stop_flag]), "max").tolist())
        self.engine.step(skip=skip)
        return skip, stop, grad_norm

    # -- evaluation and export ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Every validation sample once across ranks; metrics are ``sum / count`` over all of them."""
        if self.val_loader is None:
            return {}
        self.engine.eval()
        sums: dict[str, torch.Tensor] = {}
        batches = iter(self.val_loader)
        placeholder = None
        while True:
            batch = next(batches, None)
            # Under ZeRO-3 a forward gathers weights from every rank, so ranks whose share of the
            # validation set ran out keep stepping (on a placeholder) until all are done.
            more = torch.tensor(float(batch is not None), device=self.dist.device)
            if not self.dist.all_reduce(more, "max").item():
                break
            if batch is None:
                placeholder = placeholder or self._placeholder_batch()
            else:
                placeholder = batch
            out = self.objective.val_step(self._to_device(placeholder))
            if batch is not None:
                for key, value in out.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().float()
        self.engine.train()
        totals = self.dist.sum_counts({k: v.item() for k, v in sums.items()})
        count = totals.pop("count", 0)
        return {f"val/{k}": v / max(count, 1) for k, v in sorted(totals.items())}

    def _placeholder_batch(self) -> dict:
        size = self.cfg.data.image_size
        view = self.objective.eval_view()(Image.new("RGB", (size, size)))
        return default_collate([{**view, "label": 0}])

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

    def _resize_summary(self) -> dict:
        return {"resized": {k: v for k, v in self.resized.items() if k != "message"}} if self.resized else {}

    def _write_summary(self, extra: dict) -> None:
        summary = {**self.plan.__dict__, **extra}
        atomic_write(self.run_dir / "run.json", json.dumps(summary, indent=1).encode())


def resize_note(saved: dict, world_size: int, plan: Plan) -> dict | None:
    """What changes when a checkpoint's run (its meta data: ``saved``) continues on ``world_size``
    processes: None if nothing; else the numbers before and after and a message for the log."""
    before = saved.get("world_size")
    if before in (None, world_size):
        return None
    changes = {"world_size": [before, world_size]}
    for key in ("global_batch", "peak_lr", "total_steps"):
        if key in saved and saved[key] != getattr(plan, key):
            changes[key] = [saved[key], getattr(plan, key)]
    message = f"resuming a run written by {before} processes on {world_size}"
    if "global_batch" in changes:
        message += (f"; the global batch changes from {changes['global_batch'][0]} to {plan.global_batch} "
                    f"(data.batch_size is per process; set data.global_batch to keep it)")
        message += "".join(f", {k} {a:g} -> {b:g}" for k, (a, b) in changes.items() if k in ("peak_lr", "total_steps"))
    else:
        message += f"; the global batch stays {plan.global_batch}"
    return {**changes, "message": message}


class _Window:
    """Sums over the steps since the last log line, kept on the device until they are printed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)  # summed over this rank's micro-batches
        self.values: dict[str, torch.Tensor] = {}
        self.micro = 0
        self.steps = 0
        self.data_time = 0.0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        self.loss += loss
        for key, value in values.items():
            self.values[key] = self.values.get(key, 0.0) + value.detach().float()
        self.micro += 1

    def state_dict(self, dist: DistEnv) -> dict:
        """The sums so far, averaged over the ranks (a collective): every rank restores the same
        share, and the ranks' sum at the next flush is the uninterrupted run's. Time is not carried:
        throughput counts the steps since the resume."""
        keys = sorted(self.values)
        stacked = torch.stack([self.loss, *[self.values[k] for k in keys]]).float()
        dist.all_reduce(stacked)
        stacked = (stacked / dist.world_size).tolist()
        return {"loss": stacked[0], "values": dict(zip(keys, stacked[1:])), "micro": self.micro}

    def load_state_dict(self, state: dict) -> None:
        self.loss = torch.tensor(state["loss"], dtype=torch.float32, device=self.device)
        self.values = {k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in state["values"].items()}
        self.micro = state["micro"]

    def flush(self, dist: DistEnv, global_batch: int) -> tuple[int, dict[str, float]]:
        """(steps in the window, rank-averaged metrics with throughput and data-wait share); resets."""
        keys = sorted(self.values)
        stacked = torch.stack([self.loss, *[self.values[k] for k in keys]]) / max(self.micro, 1)
        dist.all_reduce(stacked)
        stacked /= dist.world_size
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        out = {"train/loss": stacked[0].item(), **{f"train/{k}": stacked[i + 1].item() for i, k in enumerate(keys)},
               "train/images_per_s": self.steps * global_batch / elapsed,
               "train/data_wait": self.data_time / elapsed}
        steps = self.steps
        self.reset()
        return steps, out
