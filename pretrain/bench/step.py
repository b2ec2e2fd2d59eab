"""Trainer overhead: vitscale's steps/s against a bare hand-written DeepSpeed loop.

Both train the same timm model with the same DeepSpeed config (ZeRO stage, precision), the same
AdamW and the same synthetic uint8 batch, normalized on the device, in this one process. The
runs alternate and the best of each is kept, so drifting machine load hits both alike.

    python -m pretrain.bench step [--model vit_tiny_patch16_224] [--zero 2] [--batch 8] ...
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from pretrain import hooks
from pretrain.config import load_config
from pretrain.data.transforms import normalize
from pretrain.dist import init_distributed, leave_process_group
from pretrain.engine import SkippableAdamW, deepspeed_config
from pretrain.models.backbone import create_backbone
from pretrain.trainer import Trainer


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m pretrain.bench step", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8, help="per-process batch")
    p.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32",
                   choices=["fp32", "bf16", "fp16"])
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per run")
    p.add_argument("--repeats", type=int, default=2, help="runs of each loop; the best is kept")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return p.parse_args(argv)


# The supervised recipe's device-side extras (Mixup, CutMix, erasing) off: a bare loop has none.
PLAIN_SUPERVISED = ["objective.mixup=0", "objective.cutmix=0", "objective.reprob=0", "objective.label_smoothing=0"]


def bench_overrides(args, run_dir: str) -> list[str]:
    """A timed run on synthetic batches: no checkpoints, no export, one log line at the end."""
    return [f"run.dir={run_dir}", "data.synthetic=true", "data.num_classes=1000", "data.workers=0",
            f"data.image_size={args.image_size}", f"data.batch_size={args.batch}", f"model.name={args.model}",
            "model.drop_path=0", f"engine.zero_stage={args.zero}", f"engine.precision={args.precision}",
            f"train.steps={args.warmup + args.steps}", "train.ckpt_every=0", "train.export=false",
            "train.progress=false", "train.resume=false", f"train.log_every={args.warmup + args.steps}",
            "optim.lr=1e-4"]


def bench_config(args, run_dir: str):
    return load_config(None, bench_overrides(args, run_dir) + PLAIN_SUPERVISED)


def time_trainer(cfg, dist, args) -> float:
    return trainer_rate(Trainer(cfg, dist), args.warmup)


def trainer_rate(trainer: Trainer, warmup: int) -> float:
    """Steps per second of ``trainer.fit()`` from the start of step ``warmup`` to the start of its
    last step. The trainer's steps do not wait for the device, so both stamps are taken after
    waiting for it (the last step, which logs and saves, is not timed)."""
    last = trainer.plan.total_steps - 1
    stamps: dict[int, float] = {}

    def stamp(point: str, step: int | None = None, **fields) -> None:
        if point == "step" and step in (warmup, last):
            if trainer.dist.device.type == "cuda":
                torch.cuda.synchronize(trainer.dist.device)
            stamps[step] = time.perf_counter()

    hooks.observe(stamp)
    try:
        trainer.fit()
    finally:
        hooks.forget(stamp)
    return (last - warmup) / (stamps[last] - stamps[warmup])


def time_bare_loop(cfg, dist, args) -> float:
    """The loop a user would write by hand around DeepSpeed (the baseline)."""
    import deepspeed  # the baseline is, by definition, a plain DeepSpeed loop

    torch.manual_seed(0)
    model = create_backbone(cfg.model, cfg.data.image_size, cfg.data.num_classes).to(dist.device)
    optimizer = SkippableAdamW(model.parameters(), lr=1e-4, weight_decay=0.05,
                               fused=dist.device.type == "cuda" or None)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, 1),
                                      dist_init_required=False)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8,
                           generator=generator).to(dist.device)
    labels = torch.randint(0, cfg.data.num_classes, (args.batch,), generator=generator).to(dist.device)
    dtype = next(engine.module.parameters()).dtype
    stamps = []
    for _ in range(args.warmup + args.steps):
        inputs = normalize(images, cfg.data.mean, cfg.data.std, torch.float32).to(dtype)
        loss = F.cross_entropy(engine(inputs).float(), labels)
        engine.backward(loss)
        engine.step()
        stamps.append(time.perf_counter())
    if dist.device.type == "cuda":
        torch.cuda.synchronize()
        stamps[-1] = time.perf_counter()
    times = stamps[args.warmup - 1:]
    return (len(times) - 1) / (times[-1] - times[0])


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = init_distributed()
    results = {"vitscale trainer": [], "bare DeepSpeed loop": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            cfg = bench_config(args, f"{tmp}/run{repeat}")
            results["vitscale trainer"].append(time_trainer(cfg, dist, args))
            results["bare DeepSpeed loop"].append(time_bare_loop(cfg, dist, args))
    print(f"\nmodel {args.model} @ {args.image_size}, batch {args.batch}, ZeRO-{args.zero}, {args.precision}, "
          f"{dist.device.type}, {args.steps} timed steps x {args.repeats} runs (best kept)")
    print(f"{'loop':<22}{'steps/s':>10}{'images/s':>12}{'ms/step':>10}   runs (steps/s)")
    for name, rates in results.items():
        best = max(rates)
        print(f"{name:<22}{best:>10.3f}{best * args.batch:>12.1f}{1000 / best:>10.1f}   "
              + ", ".join(f"{r:.3f}" for r in rates))
    ratio = max(results["vitscale trainer"]) / max(results["bare DeepSpeed loop"])
    print(f"ratio {ratio:.3f} (vitscale / bare loop steps per second)")
    leave_process_group()
    return 0
