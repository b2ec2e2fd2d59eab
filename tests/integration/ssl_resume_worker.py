"""One rank of the resume check (run by test_ssl_resume.py on 2 processes).

Per case: an uninterrupted run of ``train.steps``; a run stopped half-way (checkpoint) and a
fresh Trainer that resumes it. Rank 0 writes both runs' per-step losses and monitors, and whether
the teacher (full fp32), the objective's buffers (centre, queues) and the exported backbone agree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pretrain.config import load_config
from pretrain.dist import init_distributed
from pretrain.trainer import Trainer
from tests.helpers import finish_worker


def train(dist, overrides: list[str]) -> dict:
    cfg = load_config(None, overrides)
    Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, dist)
    trainer.fit()
    objective = trainer.objective
    teacher = getattr(objective, "teacher", None) or objective.target
    state = {f"teacher.{name}.{k}": v for name in teacher.nets for k, v in teacher.full_state_dict(name).items()}
    state.update({k: v.detach().cpu().clone() for k, v in objective.named_buffers()
                  if k.split(".")[0] in ("center", "queue1", "queue2", "queue_ptr")})
    return state


def main() -> None:
    out_dir, result_path, steps, cases = sys.argv[1:]
    dist = init_distributed()
    torch.set_num_threads(1)
    results = {}
    for name, overrides in json.loads(cases).items():
        whole, split = f"{out_dir}/{name}-whole", f"{out_dir}/{name}-split"
        a = train(dist, overrides + [f"run.dir={whole}", f"train.steps={steps}"])
        train(dist, overrides + [f"run.dir={split}", f"train.steps={steps}", f"train.stop_at={int(steps) // 2}"])
        b = train(dist, overrides + [f"run.dir={split}", f"train.steps={steps}"])
        if dist.is_main:
            lines = {run: [json.loads(line) for line in open(f"{d}/metrics.jsonl")] for run, d in
                     (("whole", whole), ("split", split))}
            results[name] = {
                "state_keys": len(a),
                "state_differs": sorted(k for k in a if not torch.equal(a[k], b[k])),
                "export_equal": Path(f"{whole}/export/backbone.safetensors").read_bytes() ==
                Path(f"{split}/export/backbone.safetensors").read_bytes(),
                "whole": {r["step"]: r["train/loss"] for r in lines["whole"] if "train/loss" in r},
                "split": {r["step"]: r["train/loss"] for r in lines["split"] if "train/loss" in r}}
    finish_worker(dist, result_path, results)


if __name__ == "__main__":
    main()
