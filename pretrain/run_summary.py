"""``RUN_DIR/run.json``: the plan of a run and how its last invocation started and ended (rank 0 writes it).

An invocation that started writes ``state: running``; one that ended writes how (:func:`run_state`),
at which step, its final validation metrics and what it skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.config import Config, save_config
from pretrain.dist import DistEnv
from pretrain.engine import describe_precision
from pretrain.files import atomic_write
from pretrain.plan import Plan
from pretrain.step_guard import StepGuard
from pretrain.zero_stage import ZeroStageChoice


def run_state(step: int, total_steps: int, stopped_on_request: bool) -> str:
    """How an invocation ended, as ``run.json`` records it: ``finished`` (train.steps reached),
    ``stopped`` (saved and stopped on a signal before that; the process exits with
    STOPPED_EXIT_CODE), or ``stop_at`` (ended at train.stop_at, as asked)."""
    if step >= total_steps:
        return "finished"
    return "stopped" if stopped_on_request else "stop_at"


class RunSummary:
    def __init__(self, run_dir: Path, plan: Plan, dist: DistEnv,
                 zero_stage_choice: ZeroStageChoice | None = None) -> None:
        """``zero_stage_choice``: how ``engine.zero_stage: auto`` was resolved (None: the config names the stage)."""
        self.run_dir, self.plan, self.dist = run_dir, plan, dist
        self.zero_stage = {"zero_stage_auto": {"stage": zero_stage_choice.stage, "reason": zero_stage_choice.reason}} \
            if zero_stage_choice else {}
        self.resumed: str | None = None
        self.resized: dict | None = None
        self.precision: str | None = None  # the mode the run trains in (pretrain.engine.describe_precision)

    def start(self, cfg: Config, resumed: str | None, step: int, resized: dict | None) -> None:
        """Creates the run directory with ``config.yaml`` and a running ``run.json``; ``resumed``: the
        checkpoint's tag, ``resized``: its :func:`pretrain.state.checkpointer.resize_note`."""
        self.resumed, self.resized = resumed, resized
        self.precision = describe_precision(cfg.engine)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            self._write({"resumed_from": resumed, "state": "running", "step": step, **self._resize_summary()})

    def end(self, state: str, step: int, final: dict, guard: StepGuard, skipped: dict[str, float]) -> None:
        """How the invocation ended; ``skipped``: this rank's skipped samples (summed: a collective)."""
        skipped = self.dist.sum_counts(skipped)
        if self.dist.is_main:
            self._write({"resumed_from": self.resumed, "state": state, **self._resize_summary(),
                         "step": step, "final": final, "nonfinite_steps": guard.nonfinite_steps,
                         "fp16_overflow_steps": guard.overflow_steps, "skipped_samples": skipped})

    def _resize_summary(self) -> dict:
        return {"resized": {k: v for k, v in self.resized.items() if k != "message"}} if self.resized else {}

    def _write(self, extra: dict) -> None:
        summary = {**self.plan.__dict__, "precision": self.precision, **self.zero_stage, **extra}
        atomic_write(self.run_dir / "run.json", json.dumps(summary, indent=1).encode())

