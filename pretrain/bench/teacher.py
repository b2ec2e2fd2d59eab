"""The momentum teacher's update as a share of a DINO step under ZeRO-3, on 2 processes.

    python -m pretrain.bench teacher [--steps N] [--model vit_tiny_patch16_224] [--image-size 64] [--zero-stage 3]

One DINO training run (synthetic batches, bf16, ZeRO-3) in which every step does two teacher
updates, timed apart, so that whatever else loads the machine hits both alike:

- gathered (baseline), first: gather every student parameter's full fp32 master weights
  (``safe_get_full_fp32_param``), update a full fp32 teacher held on every rank, write it back;
- vitscale, last (so that it is the teacher that trains): ``MomentumTeacher``, where each rank
  updates its own fp32 partition of the teacher from its own fp32 master partition and writes its
  teacher partition: no communication except refreshing the few small parameters DeepSpeed keeps
  whole on every rank.

A step's share for one update is its time over the step's time without the other update; each
row is the median over the steps after the first three (warm-up). The last line is the gathered
update's time over vitscale's, with both shares of a step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from pretrain.dist import init_distributed, leave_process_group
from pretrain.engine import refresh_gathered
from pretrain.processes import spawn_local


def gathered_update(teacher, students: dict, state: dict):
    """The baseline: a full fp32 teacher per rank, updated from gathered fp32 masters."""

    def update(momentum: float, engine) -> None:
        for name, module in students.items():
            current = engine.full_fp32_state_dict(module)  # a collective per parameter
            full = state.setdefault(name, {k: v.clone() for k, v in current.items()})
            with torch.no_grad():
                for key, param in module.named_parameters():
                    if param.requires_grad:
                        full[key].mul_(momentum).add_(current[key], alpha=1.0 - momentum)
                for key, t in teacher.nets[name].named_parameters():
                    if key in full and hasattr(t, "ds_tensor"):
                        shard = t.ds_tensor.view(-1)
                        flat = full[key].view(-1)
                        start = engine.dist.rank * shard.numel()
                        piece = flat[start:start + shard.numel()]
                        shard[:len(piece)].copy_(piece)
                    elif key in full:
                        t.data.copy_(full[key])
        refresh_gathered(teacher._teachers)

    return update


def worker(args) -> None:
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    dist = init_distributed()
    torch.set_num_threads(args.threads)
    cfg = load_config(None, [
        f"run.dir={args.dir}", "data.synthetic=true", "data.num_classes=10", f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch}", "data.workers=0", f"train.steps={args.steps}", "train.progress=false",
        "train.export=false", "train.ckpt_every=0", "train.log_every=1000", f"model.name={args.model}",
        "model.kwargs={dynamic_img_size: true}", "objective.name=dino", f"objective.out_dim={args.out_dim}",
        "objective.local_crops=2", f"objective.local_size={args.image_size // 2}", f"engine.zero_stage={args.zero_stage}",
        "engine.precision=bf16", "optim.lr=0.0005"])
    trainer = Trainer(cfg, dist)
    objective, teacher = trainer.objective, trainer.objective.teacher
    updates = {"gathered": gathered_update(teacher, dict(objective.student.items()), {}),
               "vitscale": teacher.update}
    times = {name: [] for name in updates}

    def both_updates(momentum, engine):
        for name, update in updates.items():
            start = time.perf_counter()
            update(momentum, engine)
            times[name].append(time.perf_counter() - start)

    teacher.update = both_updates
    trainer.fit()
    steps = [b - a for a, b in zip(trainer.step_times, trainer.step_times[1:])]
    warm = slice(3, None)  # the first steps allocate, compile and warm caches
    t_v, t_g = times["vitscale"][1:][warm], times["gathered"][1:][warm]
    steps = steps[warm]
    results = {"vitscale": (statistics.median(t_v), statistics.median([v / (s - g) for s, v, g in
                                                                        zip(steps, t_v, t_g)])),
               "gathered": (statistics.median(t_g), statistics.median([g / (s - v) for s, v, g in
                                                                        zip(steps, t_v, t_g)]))}
    step_s = statistics.median([s - g for s, g in zip(steps, t_g)])
    dist.barrier()
    if dist.is_main:
        print(f"DINO {args.model} at {args.image_size} px (+2 local crops), batch {args.batch} per rank, "
              f"out_dim {args.out_dim}, ZeRO-{args.zero_stage} bf16, 2 processes x {args.threads} thread(s), {args.steps} steps; "
              f"a step without the baseline's update: {step_s * 1e3:.1f} ms (median)")
        print(f"{'teacher update':<28} {'update ms':>10} {'share':>7}")
        for mode, (upd, share) in results.items():
            print(f"{mode:<28} {upd * 1e3:>10.2f} {100 * share:>6.1f}%")
        (u_v, share_v), (u_g, share_g) = results["vitscale"], results["gathered"]
        print(f"ratio {u_g / u_v:.1f} (gathered full-teacher update time over vitscale's; share of a step: "
              f"vitscale {100 * share_v:.1f}% (goal <= 5%), gathered {100 * share_g:.1f}%)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.bench teacher", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out-dim", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--zero-stage", type=int, choices=(1, 2, 3), default=3,
                        help="3 (default): the partitioned teacher; 1 or 2: the replicated one")
    parser.add_argument("--dir", default=None)
    args = parser.parse_args(argv)
    if args.steps < 6:
        parser.error("--steps: at least 6 (the first 4 steps are warm-up and not timed)")
    if "WORLD_SIZE" in os.environ:
        worker(args)
        leave_process_group()
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        forwarded = list(argv) if argv is not None else sys.argv[2:]
        return spawn_local(2, "pretrain.bench", ["teacher", *forwarded, "--dir", tmp])
