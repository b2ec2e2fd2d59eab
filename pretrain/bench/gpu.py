"""Training throughput against a bare timm + torch loop and against the hardware.

    python -m pretrain.bench gpu [--model M ...] [--objective supervised|dino|dinov2|moby|simmim] [--zero S ...]
                                 [--steps N] [--batch B] [--source synthetic|shards|both] ...

For each row (a model, an objective, a ZeRO stage), in this one process:
- vitscale: the Trainer on synthetic batches (a data path that costs nothing) and on shards of
  ImageNet-like JPEGs (the data benchmark's), decoded by the workers or, with ``--decode device``,
  on the device;
- bare: a loop a user would write with timm and torch alone: the same backbone (the same attention
  kernels) and batch, bf16 autocast on CUDA, torch's fused AdamW, no DeepSpeed, no data pipeline;
  for DINO, DINOv2 and MoBY, the student (online) backbone on every crop and a no-grad teacher
  (target) on the teacher's crops, heads, masks and losses left out; for SimMIM, the encoder on the
  image, mask token, decoder and loss left out.

Figures: images/s; model FLOPs utilization (the backbone's forward FLOPs counted once with
``torch.utils.flop_counter``, training = 3x forward, plus one forward of a momentum teacher, against
the device's dense bf16 peak from a small table or ``--peak-tflops``); peak memory
(``torch.cuda.max_memory_allocated``; on the CPU the process's max RSS so far). The last line is
``ratio <value> (vitscale / bare timm images per second)``: the geometric mean over the rows of
vitscale on synthetic batches against the bare loop. Without ``--model``, the project's benchmark rows
(``DEFAULT_ROWS``: the models of its throughput goals, docs/benchmarks.md, and ViT-B/16 at ZeRO 1-3).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pretrain.bench.data import imagenet_like_jpegs, write_shards
from pretrain.bench.step import PLAIN_SUPERVISED, bench_overrides, trainer_rate
from pretrain.config import load_config
from pretrain.data.transforms import normalize
from pretrain.dist import init_distributed, leave_process_group
from pretrain.models.backbone import create_backbone, on_meta_device
from pretrain.trainer import Trainer

# Dense bf16 tensor-core peaks, TFLOP/s, by a fragment of torch.cuda.get_device_name (first match).
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


@dataclass(frozen=True)
class Row:
    model: str
    objective: str = "supervised"
    zero: int = 0
    batch: int | None = None  # None: the device's default for the model


DEFAULT_ROWS = [Row("vit_small_patch16_224"), Row("vit_base_patch16_224"), Row("vit_large_patch16_224"),
                Row("swin_tiny_patch4_window7_224"), Row("swin_base_patch4_window7_224"),
                Row("vit_small_patch16_224", "dino"),
                Row("vit_base_patch16_224", zero=1), Row("vit_base_patch16_224", zero=2),
                Row("vit_base_patch16_224", zero=3)]
MULTI_CROP = ("dino", "dinov2")  # two global crops and local ones, a teacher on the global ones
# Per-GPU batches that fit an 80 GB H100 in bf16 with room to spare; on the CPU, tiny ones.
GPU_BATCH = {"vit_small": 256, "vit_base": 256, "vit_large": 128, "swin_tiny": 256, "swin_base": 128}


def parse(argv):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m pretrain.bench gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", help="timm model names (default: the project's benchmark rows, see docs/benchmarks.md)")
    p.add_argument("--objective", choices=["supervised", "dino", "dinov2", "moby", "simmim"], default="supervised")
    p.add_argument("--zero", type=int, nargs="+", default=[0], choices=[0, 1, 2, 3], help="ZeRO stages")
    p.add_argument("--batch", type=int, help="per-process batch (default: 256 or 128 on GPUs by model, 4 on CPU)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--local-crops", type=int, default=10, help="DINO's and DINOv2's local crops")
    p.add_argument("--local-size", type=int, default=96, help="DINO's and DINOv2's local crop size")
    p.add_argument("--steps", type=int, default=200 if cuda else 3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=20 if cuda else 2, help="untimed steps per run")
    p.add_argument("--source", choices=["synthetic", "shards", "both"], default="both")
    p.add_argument("--decode", choices=["workers", "device"], default="device" if cuda else "workers",
                   help="where shard JPEGs are decoded (data.decode_on_device)")
    p.add_argument("--workers", type=int, default=10 if cuda else 1, help="data workers for the shards runs")
    p.add_argument("--images", type=int, default=2000 if cuda else 32, help="JPEGs written into the shards")
    p.add_argument("--precision", default="bf16" if cuda else "fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="engine.compile=true, and compile the bare loop's model")
    p.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU (default: from a table "
                   "on known GPUs; none on CPUs)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--smoke", action="store_true", help="one tiny row on a 64 px vit_tiny: seconds on a CPU")
    p.add_argument("--profile", metavar="DIR", help="after each row, profile a few steps of vitscale on synthetic "
                   "batches with torch.profiler: print the top kernels and the device's busy share, and write "
                   "DIR/ROW.json.gz (a Chrome trace)")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.image_size, args.batch = ["vit_tiny_patch16_224"], 64, args.batch or 4
        args.steps, args.warmup, args.images = min(args.steps, 3), min(args.warmup, 2), min(args.images, 16)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1")
    return args


def rows(args) -> list[Row]:
    if not args.model:
        return DEFAULT_ROWS
    return [Row(model, args.objective, zero, args.batch) for model in args.model for zero in args.zero]


def batch_for(row: Row, device: torch.device) -> int:
    if row.batch:
        return row.batch
    if device.type != "cuda":
        return 4
    batch = next((b for prefix, b in GPU_BATCH.items() if row.model.startswith(prefix)), 128)
    return batch // 4 if row.objective in MULTI_CROP else batch // 2 if row.objective == "moby" else batch


# -- the runs -----------------------------------------------------------------------------------------
def row_overrides(row: Row, args, batch: int, run_dir: str) -> list[str]:
    """The Trainer's config for a row, on synthetic batches."""
    step_args = argparse.Namespace(image_size=args.image_size, batch=batch, model=row.model, zero=row.zero,
                                   precision=args.precision, warmup=args.warmup, steps=args.steps)
    out = bench_overrides(step_args, run_dir) + [f"objective.name={row.objective}", "data.workers=2" if
                                                 torch.cuda.is_available() else "data.workers=0"]
    if args.compile:
        out.append("engine.compile=true")
    if row.objective == "supervised":
        # RandAugment runs on PIL images in the workers (and not at all with decoding on the device).
        return out + PLAIN_SUPERVISED + ["objective.auto_augment=null", "objective.color_jitter=0"]
    if row.objective in MULTI_CROP:
        out += [f"objective.local_crops={args.local_crops}", f"objective.local_size={args.local_size}"]
        if row.model.startswith("vit_"):
            out.append("model.kwargs={dynamic_img_size: true}")
    return out


def shard_overrides(urls: list[str], args) -> list[str]:
    return ["data.synthetic=false", f"data.train={json.dumps(urls)}", f"data.workers={args.workers}",
            "data.shuffle_buffer=256", f"data.decode_on_device={str(args.decode == 'device').lower()}"]


def run_trainer(overrides: list[str], dist, warmup: int, batch: int) -> tuple[float, float]:
    """(images/s, peak memory GiB) of the Trainer."""
    cfg = load_config(None, overrides)
    with measured_memory(dist.device) as memory:
        trainer = Trainer(cfg, dist)
        rate = trainer_rate(trainer, warmup) * batch
        del trainer
    return rate, memory()


def profile_trainer(overrides: list[str], dist, args, trace: Path) -> None:
    """Profiles a short Trainer run (3 steps to warm up, 5 more; no checkpoint) and prints where the
    device's time goes."""
    from torch.profiler import ProfilerActivity, profile

    steps = ["train.steps=8", "train.log_every=8"]
    cfg = load_config(None, overrides + steps)
    trainer = Trainer(cfg, dist)
    # The Trainer saves after its last step; that copy of every weight and moment to the host would
    # dominate a profile of 8 steps (it did, on an H200: 39% of the device time was its transfers).
    trainer.save = lambda *args, **kwargs: None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dist.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        trainer.fit()
        synchronize(dist.device)
        wall_us = (time.perf_counter() - started) * 1e6
    del trainer
    trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    events = prof.key_averages()
    device_key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    sort_by = device_key if dist.device.type == "cuda" else "self_cpu_time_total"
    kernels_us = sum(getattr(e, device_key) for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"profile of {trace.name} (8 steps, 3 of them warm-up; trace written): device busy "
          f"{kernels_us / wall_us:.1%} of {wall_us / 1e6:.2f} s", file=sys.stderr)
    print(events.table(sort_by=sort_by, row_limit=15, max_name_column_width=60), file=sys.stderr, flush=True)


def crops_of(row: Row, args, batch: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """([(images, side)] through the trained backbone, [(images, side)] through a no-grad teacher)."""
    size = args.image_size
    if row.objective in MULTI_CROP:
        student = [(2 * batch, size)] + ([(args.local_crops * batch, args.local_size)] if args.local_crops else [])
        return student, [(2 * batch, size)]
    if row.objective == "moby":
        return [(2 * batch, size)], [(2 * batch, size)]
    return [(batch, size)], []


def bare_backbone(row: Row, args, overrides: list[str]):
    cfg = load_config(None, overrides)
    classes = 1000 if row.objective == "supervised" else 0
    return create_backbone(cfg.model, args.image_size, classes)


def run_bare(row: Row, args, overrides: list[str], dist, batch: int) -> tuple[float, float]:
    """(images/s, peak memory GiB) of a hand-written timm + torch loop on the same crops."""
    device, cuda = dist.device, dist.device.type == "cuda"
    student_crops, teacher_crops = crops_of(row, args, batch)
    with measured_memory(device) as memory:
        torch.manual_seed(0)
        model = bare_backbone(row, args, overrides).to(device)
        teacher = bare_backbone(row, args, overrides).to(device).requires_grad_(False) if teacher_crops else None
        if args.compile:
            model.compile(dynamic=False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=cuda or None)
        generator = torch.Generator().manual_seed(0)

        def images(count, side):
            return torch.randint(0, 256, (count, 3, side, side), dtype=torch.uint8, generator=generator).to(device)

        inputs = [images(n, s) for n, s in student_crops]
        teacher_inputs = [images(n, s) for n, s in teacher_crops]
        labels = torch.randint(0, 1000, (batch,), generator=generator).to(device)
        autocast = torch.autocast("cuda", torch.bfloat16) if cuda and args.precision == "bf16" \
            else contextlib.nullcontext()
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                synchronize(device)
                started = time.perf_counter()
            with autocast:
                if teacher is not None:
                    with torch.no_grad():
                        for x in teacher_inputs:
                            teacher(normalize(x, mean, std, torch.float32))
                outputs = [model(normalize(x, mean, std, torch.float32)) for x in inputs]
                if row.objective == "supervised":
                    loss = F.cross_entropy(outputs[0].float(), labels)
                else:
                    loss = sum(o.float().pow(2).mean() for o in outputs)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        rate = args.steps * batch / (time.perf_counter() - started)
        del model, teacher, optimizer, inputs, teacher_inputs
    return rate, memory()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def measured_memory(device: torch.device):
    """Yields a function that returns the peak memory (GiB) of what ran inside the block."""
    cuda = device.type == "cuda"
    peak = [0.0]
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield lambda: peak[0]
    finally:
        if cuda:
            peak[0] = torch.cuda.max_memory_allocated(device) / 2**30
        else:  # Linux reports KiB; a process-wide high-water mark, not this block's alone
            peak[0] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


# -- FLOPs and the hardware ---------------------------------------------------------------------------
def training_flops_per_image(row: Row, args, overrides: list[str], batch: int) -> float:
    """Model FLOPs of one training image (one sample with all its crops): 3x the backbone's forward
    over the trained crops plus 1x over a teacher's, counted on the meta device (no memory, no
    time). Attention is counted as its matmuls (the unfused path), whichever kernel runs it."""
    student_crops, teacher_crops = crops_of(row, args, batch)
    model = on_meta_device(lambda: bare_backbone(row, args, overrides))
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False

    def forward(side: int) -> float:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.empty(1, 3, side, side, device="meta"))
        return counter.get_total_flops()

    per_side = {side: forward(side) for _, side in student_crops + teacher_crops}
    total = 3 * sum(n * per_side[s] for n, s in student_crops) + sum(n * per_side[s] for n, s in teacher_crops)
    return total / batch


def peak_flops(device: torch.device, args) -> tuple[float | None, str]:
    """(peak FLOP/s or None, the device's name)."""
    if device.type != "cuda":
        import platform

        name = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
        return (args.peak_tflops * 1e12 if args.peak_tflops else None), name
    name = torch.cuda.get_device_name(device)
    if args.peak_tflops:
        return args.peak_tflops * 1e12, name
    if args.precision != "bf16":
        return None, name
    peak = next((tflops for fragment, tflops in PEAK_TFLOPS if fragment in name), None)
    return (peak * 1e12 if peak else None), name


# -- the table ----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = init_distributed()
    peak, device_name = peak_flops(dist.device, args)
    memory_label = "peak GiB" if dist.device.type == "cuda" else "max RSS GiB"
    lines, ratios = [], []
    with tempfile.TemporaryDirectory(prefix="vitscale-bench-gpu-") as tmp:
        urls = write_shards(imagenet_like_jpegs(args.images), Path(tmp), per_shard=max(1, args.images // 16)) \
            if args.source != "synthetic" else []
        for number, row in enumerate(rows(args)):
            batch = batch_for(row, dist.device)
            row = replace(row, batch=batch)
            overrides = row_overrides(row, args, batch, f"{tmp}/run{number}")
            flops = training_flops_per_image(row, args, overrides, batch)
            results = {}
            if args.source != "shards":
                results["vitscale synthetic"] = run_trainer(overrides, dist, args.warmup, batch)
            if args.source != "synthetic":
                results[f"vitscale shards ({args.decode})"] = run_trainer(
                    overrides + shard_overrides(urls, args), dist, args.warmup, batch)
            results["bare timm"] = run_bare(row, args, overrides, dist, batch)
            crops = f" 2x{args.image_size}+{args.local_crops}x{args.local_size}" if row.objective in MULTI_CROP else ""
            name = f"{row.model} {row.objective}{crops}"
            for loop, (rate, memory) in results.items():
                mfu = f"{rate * flops / peak:.1%}" if peak else "n/a"
                lines.append(f"{name:<44}{row.zero:>5}{batch:>6}  {loop:<26}{rate:>10.1f}{mfu:>8}{memory:>12.2f}")
                print(lines[-1], file=sys.stderr, flush=True)  # progress: rows take minutes on GPUs
            if args.profile:
                profile_trainer(overrides, dist, args, Path(args.profile) / f"{number}-{row.model}-{row.objective}"
                                f"-zero{row.zero}.json.gz")
            ours = results.get("vitscale synthetic", next(iter(results.values())))[0]
            ratios.append(ours / results["bare timm"][0])
    print(f"\n{device_name}; torch {torch.__version__}; {args.precision}; {args.steps} timed steps after "
          f"{args.warmup}; MFU against {peak / 1e12:.0f} TFLOP/s" if peak else
          f"\n{device_name}; torch {torch.__version__}; {args.precision}; {args.steps} timed steps after "
          f"{args.warmup}; MFU n/a (no peak known for this device: --peak-tflops)")
    print(f"{'row':<44}{'ZeRO':>5}{'batch':>6}  {'loop':<26}{'images/s':>10}{'MFU':>8}{memory_label:>12}")
    print("\n".join(lines))
    ratio = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(f"ratio {ratio:.3f} (vitscale / bare timm images per second)")
    leave_process_group()
    return 0
