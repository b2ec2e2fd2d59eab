"""One rank of the ZeRO-3 check under forced accelerator answers (run by test_zero3_answers.py on 2
processes, with DeepSpeed's fp16/bf16 answers forced through tests/accelerator.py).

For each case (an objective in a precision) it builds the objective partitioned (``engine.zero_init``)
and unpartitioned from the same seed and records how far apart their weights are and in which dtypes
the partitions are; then it trains the case for a few steps at ZeRO-3 through the real Trainer, the
momentum teachers checked against the EMA of the student's fp32 masters (ssl_teacher_worker.py).
Rank 0 writes the results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch

from pretrain.config import load_config
from pretrain.dist import init_distributed
from pretrain.engine import build_module, compute_dtype
from pretrain.objectives.base import RunContext
from pretrain.objectives.build import build_objective
from pretrain.trainer import Trainer
from tests.helpers import finish_worker
from tests.integration.ssl_teacher_worker import run_case as run_teacher_case


def build_difference(cfg, dist) -> dict:
    """The partitioned build against the unpartitioned one, cast to the compute dtype as DeepSpeed casts it."""
    ctx = RunContext(num_classes=10, total_steps=10, steps_per_epoch=10, dist=dist, precision=cfg.engine.precision)
    dtype = compute_dtype(cfg.engine.precision)
    torch.manual_seed(cfg.run.seed)
    whole = dict(build_objective(cfg, ctx).named_parameters())
    torch.manual_seed(cfg.run.seed)
    partitioned = build_module(lambda: build_objective(cfg, ctx), cfg, dist)
    params = dict(partitioned.named_parameters())
    dtypes = sorted({str(p.ds_tensor.dtype) for p in params.values()})
    worst = 0.0
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, p in params.items():
            worst = max(worst, (p.detach().float() - whole[name].detach().to(dtype).float()).abs().max().item())
    return {"dtypes": dtypes, "expected": str(dtype), "difference": worst, "count": len(params)}


def train(dist, run_dir: Path, overrides: list[str]) -> dict:
    cfg = load_config(None, [*overrides, f"run.dir={run_dir}"])
    if cfg.objective.name in ("dino", "moby"):
        return run_teacher_case(dist, str(run_dir), overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, dist)
    trainer.fit()
    lines = [json.loads(line) for line in open(run_dir / "metrics.jsonl")] if dist.is_main else []
    return {"steps": trainer.step, "losses": [r["train/loss"] for r in lines if "train/loss" in r]}


def main() -> None:
    out_dir, result_path, cases = sys.argv[1:]
    dist = init_distributed()
    torch.set_num_threads(1)
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    results = {"answers": {"fp16": bool(accelerator.is_fp16_supported()),
                           "bf16": bool(accelerator.is_bf16_supported())}}
    for case, overrides in json.loads(cases).items():
        cfg = load_config(None, [*overrides, f"run.dir={out_dir}/{case}"])
        results[case] = {"build": build_difference(cfg, dist), "run": train(dist, Path(out_dir) / case, overrides)}
    finish_worker(dist, result_path, results)


if __name__ == "__main__":
    main()
