"""One rank of the elastic resume check (run by test_elastic_resume.py under torchrun, 1 or 2 processes).

Jobs, in order, each ``[kind, name, overrides]``:
- ``whole``: an uninterrupted run;
- ``stop``: a run stopped early (``train.stop_at``); rank 0 then saves the full state it checkpointed
  (student fp32 weights, teacher, objective buffers) to ``OUT/NAME-saved.pt``;
- ``resume``: the same run dir taken up by this run's processes: the re-sharded state is compared with
  what ``stop`` saved; one step is taken and the exported teacher is compared with the EMA of the
  re-sharded teacher and the student after that step; then the run goes on to its end.
Each job records the sample keys it trained on in ``OUT/NAME-KIND-keys/`` (VITSCALE_TEST_KEYS).
Rank 0 writes what it found to ``OUT/NAME-resume.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from pretrain.config import for_world_size, load_config
from pretrain.dist import init_distributed
from pretrain.trainer import Trainer
from tests.faults import KEYS_ENV
from tests.helpers import end_worker

BUFFERS = ("center", "queue1", "queue2", "queue_ptr")


def teacher_of(objective):
    return getattr(objective, "teacher", None) or objective.target


def full_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Student fp32 masters, the teacher's full masters and the objective's buffers (a collective)."""
    objective = trainer.objective
    student = getattr(objective, "student", None) or objective.online
    state = {f"student.{k}": v for k, v in trainer.engine.full_fp32_state_dict(student).items()}
    teacher = teacher_of(objective)
    state.update({f"teacher.{name}.{k}": v for name in teacher.nets for k, v in teacher.full_state_dict(name).items()})
    state.update({k: v.detach().cpu().clone() for k, v in objective.named_buffers() if k in BUFFERS})
    return state


def trainer_for(dist, overrides: list[str]) -> Trainer:
    cfg = for_world_size(load_config(None, overrides), dist.world_size)
    Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, dist)


def main() -> None:
    out, jobs = Path(sys.argv[1]), json.loads(sys.argv[2])
    dist = init_distributed()
    torch.set_num_threads(1)
    for kind, name, overrides in jobs:
        keys = out / f"{name}-{kind}-keys"
        keys.mkdir(parents=True, exist_ok=True)
        os.environ[KEYS_ENV] = str(keys)
        if kind in ("whole", "stop"):
            trainer = trainer_for(dist, overrides)
            trainer.fit()
            if kind == "stop":
                saved = full_state(trainer)
                if dist.is_main:
                    torch.save(saved, out / f"{name}-saved.pt")
            continue
        # resume: the re-sharded state, one step, then on to the end
        probe = trainer_for(dist, overrides)
        probe.resume()
        start = probe.step
        resharded = full_state(probe)
        stop = trainer_for(dist, overrides + [f"train.stop_at={start + 1}"])
        stop.fit()
        resized = json.loads((Path(stop.run_dir) / "run.json").read_text()).get("resized")
        after = full_state(stop)
        exported = stop.objective.backbone_state_dict(stop.engine)
        momentum = stop.objective.momentum(start)
        trainer_for(dist, overrides).fit()
        if dist.is_main:
            saved = torch.load(out / f"{name}-saved.pt", weights_only=True)
            teacher_name = next(iter(teacher_of(stop.objective).nets))
            student_prefix = {"backbone": "student.backbone.", "encoder": "student.encoder."}
            ema_error = 0.0
            for key, value in exported.items():
                teacher_key = f"teacher.{teacher_name}.{key}"
                student_key = student_prefix[teacher_name] + key
                if teacher_key in resharded and student_key in after and value.is_floating_point():
                    expected = momentum * resharded[teacher_key] + (1 - momentum) * after[student_key]
                    ema_error = max(ema_error, float((value - expected).abs().max()))
            result = {"start": start, "resized": resized, "momentum": momentum, "ema_error": ema_error,
                      "exported_keys": len(exported),
                      "resharded_differs": sorted(k for k in saved if not torch.equal(saved[k], resharded[k])),
                      "compared": len(saved),
                      "teacher_moved": float(max((after[k] - resharded[k]).abs().max() for k in after
                                                 if k.startswith("teacher.")))}
            (out / f"{name}-resume.json").write_text(json.dumps(result))
    end_worker()


if __name__ == "__main__":
    main()
