"""One rank of the schedule-window resume check (run by test_schedule_resume.py under torchrun).

``OUT CASES STOPS PHASE``: CASES maps a case name to its overrides; STOPS lists the steps at which
checkpoints are taken up.
- ``PHASE=reference`` (2 processes): each case runs uninterrupted to its end, saving a checkpoint at
  every step; then, for each stop step, a copy of the run dir whose ``latest`` names that step is
  resumed on these processes and its full state (weights, teacher, buffers, Adam's moments and step
  counts) saved by rank 0 to ``OUT/CASE-STOP-saved.pt``; the reference's final Adam step counts go
  to ``OUT/CASE-reference.json``.
- ``PHASE=resume`` (another number of processes): each copy is resumed here (re-sharded through the
  universal checkpoint), its state compared with what was saved, then trained to the end. Rank 0
  writes what it found to ``OUT/CASE-STOP-resume.json``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from pretrain.config import for_world_size, load_config
from pretrain.dist import init_distributed
from pretrain.files import atomic_write
from pretrain.trainer import Trainer
from tests.helpers import end_worker

BUFFERS = ("center", "queue1", "queue2", "queue_ptr")


def trainer_for(dist, overrides: list[str]) -> Trainer:
    cfg = for_world_size(load_config(None, overrides), dist.world_size)
    Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, dist)


def adam_steps(trainer: Trainer) -> dict[int, list[float]]:
    """Adam's step count of each param group's state on this rank, by the group's index (the same on
    every rank): ZeRO-3 keeps one state per sub-group, ZeRO-1/2 one per group, no ZeRO one per parameter."""
    wrapper, base = trainer.engine.engine.optimizer, trainer.engine.optimizer
    if hasattr(wrapper, "fp32_partitioned_groups_flat"):
        pairs = [(wrapper.sub_group_to_group_id[i], flat) for i, flat in enumerate(wrapper.fp32_partitioned_groups_flat)]
    elif hasattr(wrapper, "single_partition_of_fp32_groups"):
        pairs = list(enumerate(wrapper.single_partition_of_fp32_groups))
    else:
        pairs = [(i, p) for i, g in enumerate(base.param_groups) for p in g["params"]]
    steps: dict[int, list[float]] = {}
    for group, param in pairs:
        step = base.state.get(param, {}).get("step")
        steps.setdefault(group, []).append(None if step is None else float(step))
    return steps


def full_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 master and Adam moments, the teacher's masters and the objective's
    buffers, whole (a collective)."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_get_full_fp32_param, \
        safe_get_full_optimizer_state

    wrapper = trainer.engine.engine.optimizer
    if hasattr(wrapper, "single_partition_of_fp32_groups"):
        # ZeRO-1/2 link each parameter to its moments at its first step; none was taken since the load.
        for lp_params, flat in zip(wrapper.bit16_groups, wrapper.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(lp_params, flat, wrapper.optimizer.state)
    objective = trainer.objective
    state = {}
    for name, p in objective.named_parameters():
        if not p.requires_grad:
            continue
        state[f"fp32.{name}"] = safe_get_full_fp32_param(p)
        for key in ("exp_avg", "exp_avg_sq"):
            value = safe_get_full_optimizer_state(p, key)
            if value is not None:
                state[f"{key}.{name}"] = value
    teacher = getattr(objective, "momentum_teacher", None)
    if teacher is not None:
        nets = teacher().nets
        state.update({f"teacher.{net}.{k}": v for net in nets for k, v in teacher().full_state_dict(net).items()})
    state.update({k: v for k, v in objective.named_buffers() if k in BUFFERS})
    return {k: v.detach().float().cpu().clone() for k, v in state.items() if v is not None}


def stopped_copy(run_dir: Path, stop: int) -> Path:
    """A copy of ``run_dir`` as a run stopped at ``stop`` leaves it: that checkpoint, named by ``latest``."""
    copy = run_dir.parent / f"{run_dir.name}-at-{stop}"
    tag = f"step_{stop:08d}"
    (copy / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copytree(run_dir / "checkpoints" / tag, copy / "checkpoints" / tag)
    atomic_write(copy / "checkpoints" / "latest", tag.encode())
    return copy


def main() -> None:
    out, cases, stops, phase = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
    dist = init_distributed()
    torch.set_num_threads(1)
    for name, overrides in cases.items():
        run_dir = out / name
        if phase == "reference":
            reference = trainer_for(dist, [*overrides, f"run.dir={run_dir}", "train.ckpt_every=1", "train.keep_last=100"])
            reference.fit()
            steps = adam_steps(reference)
            if dist.is_main:
                (out / f"{name}-reference.json").write_text(json.dumps(steps))
                for stop in stops:
                    stopped_copy(run_dir, stop)
            dist.barrier()
            for stop in stops:
                probe = trainer_for(dist, [*overrides, f"run.dir={run_dir}-at-{stop}"])
                probe.resume()
                saved = {**full_state(probe), "adam_steps": adam_steps(probe)}
                if dist.is_main:
                    torch.save(saved, out / f"{name}-{stop}-saved.pt")
            continue
        for stop in stops:
            resumed = trainer_for(dist, [*overrides, f"run.dir={run_dir}-at-{stop}"])
            resumed.resume()
            state, steps = full_state(resumed), adam_steps(resumed)
            resumed.fit()
            final_steps = adam_steps(resumed)
            if dist.is_main:
                saved = torch.load(out / f"{name}-{stop}-saved.pt", weights_only=True)
                saved_steps = saved.pop("adam_steps")
                result = {"step": resumed.step, "compared": len(saved),
                          "differs": sorted(k for k in saved if k not in state or not torch.equal(saved[k], state[k])),
                          "adam_steps": steps, "saved_adam_steps": saved_steps, "final_adam_steps": final_steps,
                          "state": json.loads((Path(resumed.run_dir) / "run.json").read_text())["state"]}
                (out / f"{name}-{stop}-resume.json").write_text(json.dumps(result))
    end_worker()


if __name__ == "__main__":
    main()
