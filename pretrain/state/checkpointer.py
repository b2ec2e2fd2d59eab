"""What goes into a run's checkpoints, and into whom it is loaded back.

The trainer hands the :class:`Checkpointer` its engine and its stateful components by name
(:class:`~pretrain.state.stateful.Stateful`). A save is the engine's shards, with the components'
states as their client state (``{"world_size": N, name: component.state_dict(), ...}``), written
whole by :class:`~pretrain.state.checkpoints.Checkpoints`; a resume verifies the checkpoint, has the
engine load its shards (through the universal conversion when ZeRO's partitions were written for
another number of processes), then hands each component its state, re-sharded by the component when
the number of processes changed. A component a checkpoint holds no state for (one added since it was
written) keeps its fresh state.
"""

from __future__ import annotations

from pretrain.config import Config
from pretrain.dist import DistEnv
from pretrain.engine import partitioned_shape
from pretrain.plan import Plan
from pretrain.state.checkpoints import Checkpoints
from pretrain.state.conversion import convert_to_universal
from pathlib import Path

from pretrain.state.layout import CHECKPOINTS_DIR, checkpoint_identity, latest_meta, step_of
from pretrain.state.stateful import Stateful

WORLD_SIZE = "world_size"  # the client state's own entry: how many processes saved it
PRECISION = "precision_mode"  # meta.json's: engine.precision and the resolved engine.autocast


def checkpoint_precision(cfg: Config) -> dict | None:
    """The precision mode of the checkpoint a run with ``cfg`` would resume, looked up before anything
    is built (the engine is built in it; :func:`pretrain.engine.resolve_autocast`): ``{"precision",
    "autocast"}``, or None for a fresh run. Checkpoints that record none were written in DeepSpeed's
    mixed precision (no autocast), the only mode before it was recorded."""
    if not cfg.train.resume:
        return None
    found = latest_meta(Path(cfg.run.dir) / CHECKPOINTS_DIR)
    if found is None:
        return None
    return found[1].get(PRECISION, {"precision": cfg.engine.precision, "autocast": False})


class Checkpointer:
    def __init__(self, cfg: Config, plan: Plan, dist: DistEnv, engine, components: dict[str, Stateful]) -> None:
        """``components``: what the checkpoints hold besides the engine's state, by the names they are
        saved under (the names are the format: see :func:`upgraded`)."""
        self.cfg, self.plan, self.dist, self.engine = cfg, plan, dist, engine
        self.components = components
        self.files = Checkpoints(cfg.run.dir, cfg.train.keep_last, dist, every=cfg.train.ckpt_every)
        self.directory = self.files.directory
        self.resized: dict | None = None  # set by resume() when the run continues on another world size

    def due(self, step: int, stop_requested: bool = False, last: bool = False) -> bool:
        """Whether to save after ``step`` (:meth:`Checkpoints.due`: ``train.ckpt_every``, a stop, the end)."""
        return self.files.due(step, stop_requested, last)

    def latest(self) -> str | None:
        return self.files.latest()

    def save(self, step: int) -> str:
        """Checkpoint ``step`` (a collective); its tag."""
        state = {WORLD_SIZE: self.dist.world_size, **{name: c.state_dict() for name, c in self.components.items()}}
        return self.files.save(self.engine, step, state, self.checkpoint_meta())

    def resume(self) -> str | None:
        """Load the checkpoint to resume from (``latest``, or ``train.resume_from`` when that one is
        refused), verified before anything is loaded; its tag, or None for a fresh run."""
        if not self.cfg.train.resume:
            return None
        tag = self.files.resumable(self.checkpoint_meta(), fallback=self.cfg.train.resume_from)
        if tag is None:
            return None
        saved = self.files.meta(tag)
        self.resized = resize_note(saved, self.dist.world_size, self.plan)
        state = upgraded(self._load_shards(tag, saved.get(WORLD_SIZE)))
        for name, component in self.components.items():
            if name in state:
                component.load_state_dict(self._resharded(component, state[name], state[WORLD_SIZE]))
        self.files.saved_step = step_of(tag)
        return tag

    def _load_shards(self, tag: str, saved_world_size: int | None) -> dict:
        """Have the engine load its shards of checkpoint ``tag``, written by ``saved_world_size``
        processes (None: as many as now), through their universal conversion where the engine needs
        one; the client state saved with them."""
        engine = self.engine
        if engine.reshards(saved_world_size):
            return engine.load_universal(convert_to_universal(self.directory / tag, engine.module, self.dist))
        return engine.load(str(self.directory), tag)

    def _resharded(self, component: Stateful, state: dict, saved_world_size: int) -> dict:
        if saved_world_size == self.dist.world_size:
            return state
        return component.reshard(state, saved_world_size)

    def checkpoint_meta(self) -> dict:
        """What a checkpoint must match to be resumed by this run (see Checkpoints.verify), and the
        numbers a resume on another world size reports (:func:`resize_note`)."""
        shapes = {name: list(partitioned_shape(p)) for name, p in self.engine.module.named_parameters()}
        return {**checkpoint_identity(self.cfg, shapes), WORLD_SIZE: self.dist.world_size,
                PRECISION: {"precision": self.cfg.engine.precision, "autocast": self.cfg.engine.autocast},
                "data_workers": self.cfg.data.workers, "global_batch": self.plan.global_batch,
                "peak_lr": self.plan.peak_lr, "total_steps": self.plan.total_steps}


def upgraded(client_state: dict) -> dict:
    """The components' states, by name, from a checkpoint's client state (which also holds the
    engine's own entries).

    Checkpoints written before the components were saved by name (before pretrain.state existed;
    tests/fixtures/legacy_checkpoint is one) kept the step guard's counts and the metrics window in
    the trainer's entry: ``{"trainer": {"step", "nonfinite_steps", "overflow_steps" (absent before
    fp16 overflows were counted), "world_size", "global_batch", "log_window" (absent before it was
    kept)}, "data": the data position}``. They are read as today's ``"trainer": {"step"}``,
    ``"step_guard"``, ``"log_window"`` and ``"data"``.
    """
    if WORLD_SIZE in client_state:
        return client_state
    trainer = client_state["trainer"]
    state = {WORLD_SIZE: trainer[WORLD_SIZE], "trainer": {"step": trainer["step"]},
             "step_guard": {k: trainer[k] for k in ("nonfinite_steps", "overflow_steps") if k in trainer},
             "data": client_state["data"]}
    if "log_window" in trainer:
        state["log_window"] = trainer["log_window"]
    return state


def resize_note(saved: dict, world_size: int, plan: Plan) -> dict | None:
    """What changes when a checkpoint's run (its meta data: ``saved``) continues on ``world_size``
    processes: None if nothing; else the numbers before and after and a message for the log."""
    before = saved.get(WORLD_SIZE)
    if before in (None, world_size):
        return None
    changes = {WORLD_SIZE: [before, world_size]}
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
