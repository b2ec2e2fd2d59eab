"""One rank of the SimMIM runs (run by test_simmim.py on 2 processes): several runs in one process
group, to pay for the processes' start-up once; a run given a stop step is stopped there and
resumed (with more overrides, when the case names them). Rank 0 writes each run's per-step metrics
and its optimizer's param groups at the end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pretrain.config import load_config
from pretrain.dist import init_distributed
from pretrain.trainer import Trainer
from tests.helpers import end_worker


def main() -> None:
    out_dir, result_path, cases = sys.argv[1:]
    dist = init_distributed()
    torch.set_num_threads(1)
    run_cases(dist, out_dir, result_path, cases)
    end_worker()


def run_cases(dist, out_dir: str, result_path: str, cases: str) -> None:
    results = {}
    for name, (recipe, overrides, stop_at, *resumed_with) in json.loads(cases).items():
        run_dir = Path(out_dir) / name
        run_dir.mkdir(parents=True, exist_ok=True)
        if stop_at:  # stopped there with a checkpoint, then resumed by a fresh Trainer (with resumed_with)
            Trainer(load_config(recipe, [*overrides, f"run.dir={run_dir}", f"train.stop_at={stop_at}"]), dist).fit()
        trainer = Trainer(load_config(recipe, [*overrides, *(resumed_with[0] if resumed_with else []),
                                               f"run.dir={run_dir}"]), dist)
        trainer.fit()
        if dist.is_main:
            lines = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
            results[name] = {"dir": str(run_dir),
                             "steps": {r["step"]: {k[6:]: v for k, v in r.items() if k.startswith("train/")}
                                       for r in lines if "train/loss" in r},
                             "groups": param_group_report(trainer.engine.optimizer)}
    if dist.is_main:
        with open(result_path, "w") as f:
            json.dump(results, f)


def param_group_report(optimizer) -> list[dict]:
    """Each param group's freeze settings, last lr and Adam step count (None: no Adam state yet)."""
    def adam_steps(group):
        steps = [float(optimizer.state[p]["step"]) for p in group["params"] if "step" in optimizer.state.get(p, {})]
        return max(steps) if steps else None
    return [{"freeze_steps": g.get("freeze_steps"), "zero_lr_steps": g.get("zero_lr_steps"), "lr": g["lr"],
             "adam_steps": adam_steps(g)} for g in optimizer.param_groups]


if __name__ == "__main__":
    main()
