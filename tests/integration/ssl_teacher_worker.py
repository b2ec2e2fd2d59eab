"""One rank of the teacher-exactness check (run by test_ssl_teacher.py on 2 processes).

For each (objective, ZeRO stage, precision) given, it trains a few steps through the real Trainer
and, after every optimizer step, computes outside the engine the EMA of the student's gathered fp32
master weights. Rank 0 writes, per case, the largest difference between that reference and the
teacher's fp32 state, and between the teacher's compute weights and the state cast to their dtype.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch

from pretrain.config import load_config
from pretrain.dist import init_distributed
from pretrain.schedules import cosine
from pretrain.trainer import Trainer
from tests.helpers import finish_worker


def student_and_teacher(objective):
    if hasattr(objective, "student"):
        return {k: objective.student[k] for k in ("backbone", "head")}, objective.teacher
    return {k: objective.online[k] for k in ("encoder", "projector")}, objective.target


def run_case(dist, run_dir: str, overrides: list[str]) -> dict:
    cfg = load_config(None, overrides + [f"run.dir={run_dir}"])
    Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, dist)
    objective, engine = trainer.objective, trainer.engine
    students, teacher = student_and_teacher(objective)
    reference = {k: engine.full_fp32_state_dict(m) for k, m in students.items()}  # the initial weights
    trainable = {k: [n for n, p in m.named_parameters() if p.requires_grad] for k, m in students.items()}
    original = objective.after_step

    def after_step(step: int, eng) -> None:
        original(step, eng)
        m = cosine(step, trainer.plan.total_steps, cfg.objective.momentum, 1.0)
        for key, module in students.items():
            current = eng.full_fp32_state_dict(module)
            for n in trainable[key]:
                reference[key][n] = reference[key][n] * m + current[n] * (1.0 - m)

    objective.after_step = after_step
    trainer.fit()
    worst_master = worst_compute = 0.0
    for key in students:
        state = teacher.full_state_dict(key)
        params = dict(teacher.nets[key].named_parameters())
        for n in trainable[key]:
            worst_master = max(worst_master, (state[n] - reference[key][n]).abs().max().item())
            with deepspeed.zero.GatheredParameters([params[n]]):
                compute = params[n].detach().float().cpu()
            expected = state[n].to(params[n].dtype).float()
            worst_compute = max(worst_compute, (compute - expected).abs().max().item())
    return {"master": worst_master, "compute": worst_compute, "steps": trainer.step,
            "moved": max((reference[k][n] - engine.full_fp32_state_dict(students[k])[n]).abs().max().item()
                         for k in students for n in trainable[k])}


def main() -> None:
    out_dir, result_path, cases = sys.argv[1:]
    dist = init_distributed()
    torch.set_num_threads(1)
    results = {}
    for case, overrides in json.loads(cases).items():
        results[case] = run_case(dist, f"{out_dir}/{case}", overrides)
    finish_worker(dist, result_path, results)


if __name__ == "__main__":
    main()
