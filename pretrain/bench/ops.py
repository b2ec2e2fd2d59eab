"""The work of one training step, counted: vitscale's step against a bare loop doing the same maths.

    python -m pretrain.bench ops [--rows zero0 zero1 zero2 zero3 dino moby simmim dinov2] [--steps 4]
                                 [--threads 1] [--compile]

Every aten op the step dispatches is a kernel launch a GPU waits for, and every read of a device
value on the host (``item``, ``tolist``, ``bool`` of a tensor, and ops whose output size depends on
the values: ``nonzero``, boolean indexing) stalls the GPU's queue; both can be counted on a CPU. For
each row, a few optimizer steps of vitscale's trainer (synthetic uint8 batches, bf16) and of a bare
loop (pretrain.bench.bare_steps) run under a dispatch-counting mode; per steady-state step (the
first two are warm-up: ZeRO-3 records its prefetch trace in the second, asking every rank for
its module and parameter order element by element; the last one logs) the table gives the ops dispatched, the host syncs (each with
the line that asked for it), the bytes copied, the ratio of vitscale's ops to the bare loop's, and
the same for the ops that are not views (``kernels``: a view or an alias launches no GPU kernel).

Rows: ``zero0`` to ``zero3``, supervised ViT-B/16 (32 px, batch 2) against a bare timm loop (on 2
processes gradients averaged as DDP does), ZeRO 1-3 on ``--nproc`` processes; ``dino``, DINO
ViT-S/16 with 2 global and 2 local crops against the step of DINO's ``main_dino.py``; ``moby``,
``simmim`` and ``dinov2``: the recipes configs/pretrain/moby_swin_tiny.yaml (Swin-T),
simmim_swin_base.yaml (Swin-B) and dinov2_vit_l14_in22k.yaml (ViT-L/14, Sinkhorn-Knopp centring) at
tiny sizes (Swin at 32 px with 4-token windows, ViT-L/14 at 28 px with 2 local crops of 14 px and
4096 prototypes per head, batch 2) against the steps of Transformer-SSL, microsoft/SimMIM and
facebookresearch/dinov2. Every row but ZeRO 1-3 runs on one process. The last lines: ``ssl``, the
worst self-supervised ops ratio (when those rows ran), then ``ratio``, the worst supervised ops
ratio at ZeRO 0-2 (``ratio`` is the self-supervised one when no supervised row ran).

``--compile`` sets ``engine.compile=true`` and compiles the bare loops' backbones the same way; a
column then gives torch._dynamo's graph breaks, graphs and recompiles per loop (over every step,
with the commonest break reasons), and the ops counted are those still dispatched through aten
(outside the compiled graphs, and their library calls): inductor's own kernels are not seen.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROWS = ("zero0", "zero1", "zero2", "zero3", "dino", "moby", "simmim", "dinov2")
SELF_SUPERVISED = ("dino", "moby", "simmim", "dinov2")
SYNC_OPS = {"_local_scalar_dense"}  # item(), float(t), bool(t): the host waits for the device's value
# Outputs whose size depends on the values: the device must tell the host how many before it goes on.
SIZE_SYNC_OPS = {"nonzero", "masked_select"}
INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}  # with a bool index: a nonzero inside
SYNC_METHODS = {"tolist", "numpy"}  # reads of a whole tensor on the host (no aten op on a CPU tensor)
COPY_OPS = {"copy_", "_to_copy"}
HERE = os.path.abspath(__file__)
WARMUP_STEPS = 2  # not counted: first calls, and ZeRO-3's trace, recorded in its second step


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m pretrain.bench ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per loop (the first two and the last not counted)")
    p.add_argument("--nproc", type=int, default=2, help="processes for ZeRO 1-3")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true",
                   help="engine.compile=true, bare backbones compiled; report graph breaks and recompiles")
    p.add_argument("--out", help=argparse.SUPPRESS)  # a worker's result file
    p.add_argument("--row", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def caller() -> str:
    """file:line of the innermost frame outside torch and this file: who asked for the sync."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename
        if name != HERE and f"{os.sep}torch{os.sep}" not in name:
            return f"{os.path.relpath(name) if 'site-packages' not in name else name.split('site-packages/')[1]}:{frame.lineno}"
    return "?"


class StepCounter(TorchDispatchMode):
    """Counts, per step (``mark()`` starts the next), the aten ops dispatched, the syncs and copy bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[dict] = []
        self.mark()

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Otherwise torch.compile, seeing a dispatch mode on the stack, runs every frame eagerly:
        # with it, dynamo compiles and the mode counts what the compiled code still dispatches.
        return True

    def mark(self) -> None:
        self.steps.append({"ops": 0, "kernels": 0, "syncs": Counter(), "copy_bytes": 0})

    def sync(self, what: str) -> None:
        self.steps[-1]["syncs"][f"{what} at {caller()}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        step, name = self.steps[-1], func.overloadpacket.__name__
        step["ops"] += 1
        step["kernels"] += not func.is_view  # views and aliases (view, detach, slice, t) launch no kernel
        if name in SYNC_OPS or name in SIZE_SYNC_OPS:
            self.sync(name)
        elif name in INDEX_OPS and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.sync(f"{name} (bool mask)")
        elif name in COPY_OPS and isinstance(out, torch.Tensor):
            step["copy_bytes"] += out.numel() * out.element_size()
        return out


class HostReads(TorchFunctionMode):
    """Tensor methods that read values on the host without an aten op on a CPU tensor."""

    def __init__(self, counter: StepCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in SYNC_METHODS:
            self.counter.sync(func.__name__)
        return func(*args, **(kwargs or {}))


def counted(run, steps: int) -> dict:
    """``run(mark)`` under the counting modes, ``mark()`` called at the start of each step; the
    per-step averages over the steady-state steps (not the first, not the last)."""
    from torch._dynamo.utils import clear_compilation_metrics, counters

    torch._dynamo.reset()  # the other loop's graphs compile the same timm code: not this loop's recompiles
    counters.clear()
    clear_compilation_metrics()
    counter = StepCounter()
    with HostReads(counter), counter:
        run(counter.mark)
    # [0]: before the first step, [1] and [2]: the warm-up steps, [steps]: the log step
    measured = counter.steps[1 + WARMUP_STEPS:steps]
    syncs = Counter()
    for step in measured:
        syncs.update(step["syncs"])
    n = max(len(measured), 1)
    return {"ops": sum(s["ops"] for s in measured) / n, "kernels": sum(s["kernels"] for s in measured) / n, "copy_bytes": sum(s["copy_bytes"] for s in measured) / n,
            "syncs": {k: v / n for k, v in syncs.most_common()}, "dynamo": dynamo_counts()}


def dynamo_counts() -> dict:
    """What torch._dynamo compiled since its counters were cleared: graph breaks (and the commonest
    reasons), graphs, and recompilations (compiles of a frame that already had a graph)."""
    from torch._dynamo.utils import counters, get_compilation_metrics

    breaks = counters["graph_break"]
    return {"graph_breaks": sum(breaks.values()), "graphs": counters["stats"]["unique_graphs"],
            "recompiles": sum(1 for m in get_compilation_metrics() if m.recompile_reason),
            "break_reasons": dict(breaks.most_common(3))}


# -- the rows' configs ----------------------------------------------------------------------------------
SUPERVISED = ["model.name=vit_base_patch16_224", "data.image_size=32", "objective.mixup=0", "objective.cutmix=0",
              "objective.reprob=0", "objective.label_smoothing=0"]
DINO = ["objective.name=dino", "model.name=vit_small_patch16_224", "model.kwargs.dynamic_img_size=true",
        "data.image_size=32", "objective.local_crops=2", "objective.local_size=16",
        "objective.out_dim=4096", "train.clip_grad=3.0", "train.clip_mode=per_param"]
# A recipe's run length, batch and warm-up (in epochs of a data set the synthetic data has not) give way
# to the row's; its sizes to tiny ones that keep its layout.
FROM_RECIPE = ["data.global_batch=null", "train.epochs=null", "optim.warmup_epochs=0"]
ROW_CONFIGS = {
    "supervised": (None, SUPERVISED),
    "dino": (None, DINO),
    # 32 px: 8, 4, 2, 1 tokens a side; 4-token windows keep stage 1 shifted, later stages one window.
    "moby": ("configs/pretrain/moby_swin_tiny.yaml", [*FROM_RECIPE, "model.kwargs={window_size: 4}",
                                                       "data.image_size=32"]),
    "simmim": ("configs/pretrain/simmim_swin_base.yaml", [*FROM_RECIPE, "model.kwargs={window_size: 4}",
                                                           "data.image_size=32", "objective.mask_patch_size=8"]),
    # 28 px: 2 x 2 patches, local crops of one patch; per_gpu_batch 32 would not divide the batch of 2.
    "dinov2": ("configs/pretrain/dinov2_vit_l14_in22k.yaml", [*FROM_RECIPE, "data.image_size=28",
                                                               "objective.local_crops=2", "objective.local_size=14",
                                                               "objective.out_dim=4096", "objective.ibot_out_dim=4096",
                                                               "objective.per_gpu_batch=null"]),
}


def kind(row: str) -> str:
    return "supervised" if row.startswith("zero") else row


def row_config(row: str, steps: int, run_dir: str, compile_: bool = False):
    """The resolved config of ``row``: vitscale's loop trains it, the bare loop reads its hyper-parameters."""
    from pretrain.config import load_config

    recipe, overrides = ROW_CONFIGS[kind(row)]
    stage = int(row[-1]) if row.startswith("zero") else 0
    return load_config(recipe, [*overrides, "data.synthetic=true", "data.workers=0", "data.batch_size=2",
                                "data.num_classes=1000", "model.drop_path=0", f"engine.zero_stage={stage}",
                                "engine.precision=bf16", f"engine.compile={str(compile_).lower()}",
                                f"train.steps={steps}", f"train.log_every={steps}", "train.ckpt_every=0",
                                "train.export=false", "train.progress=false", "train.resume=false",
                                f"run.dir={run_dir}", "optim.lr=1e-4"])


# -- vitscale ---------------------------------------------------------------------------------------------
def vitscale_run(cfg, dist):
    from pretrain import hooks
    from pretrain.trainer import Trainer

    trainer = Trainer(cfg, dist)
    trainer.save = lambda: None  # the work of a step is counted, not a checkpoint's

    def run(mark):
        def on_step(point, **fields):
            if point == "step":
                mark()
        hooks.observe(on_step)
        try:
            trainer.fit()
        finally:
            hooks.forget(on_step)
    return run


# -- one row --------------------------------------------------------------------------------------------------
def measure(row: str, steps: int, dist, compile_: bool = False) -> dict:
    from pretrain.bench.bare_steps import BARE_STEPS

    with tempfile.TemporaryDirectory() as tmp:
        cfg = row_config(row, steps, tmp, compile_)
        ours = counted(vitscale_run(cfg, dist), steps)
    gc.collect()  # vitscale's networks go before the bare loop builds its own (ViT-L twice is 2 x 6 GB)
    bare = counted(BARE_STEPS[kind(row)](cfg, dist), steps)
    return {"vitscale": ours, "bare": bare}


def worker(args) -> None:
    from pretrain.dist import init_distributed, leave_process_group

    dist = init_distributed()
    result = measure(args.row, args.steps, dist, args.compile)
    if dist.is_main:
        Path(args.out).write_text(json.dumps(result))
    leave_process_group()


def worst_ratio(results: dict[str, dict], rows) -> float | None:
    """The largest vitscale / bare ops ratio among ``rows`` that ran (None when none did)."""
    ratios = [r["vitscale"]["ops"] / r["bare"]["ops"] for row, r in results.items() if row in rows]
    return max(ratios) if ratios else None


def report(results: dict[str, dict], nproc: int, compiled: bool = False) -> None:
    print(f"ops dispatched per optimizer step (steady state), host syncs and copy bytes; torch {torch.__version__}, "
          f"ZeRO 1-3 on {nproc} processes{'; engine.compile=true' if compiled else ''}")
    dynamo_column = f"{'breaks/graphs/recompiles':>26}" if compiled else ""
    print(f"{'row':<7}{'loop':<10}{'ops':>9}{'syncs':>7}{'copy KiB':>10}{'ratio':>7}{'kernels':>9}{'ratio':>7}"
          f"{dynamo_column}   "
          f"would sync the device")
    for row, result in results.items():
        bare_ops = result["bare"]["ops"]
        for loop in ("bare", "vitscale"):
            r = result[loop]
            syncs = sum(r["syncs"].values())
            ratio = r["ops"] / bare_ops
            dynamo = ""
            if compiled:
                counts = r["dynamo"]
                dynamo = f"{counts['graph_breaks']}/{counts['graphs']}/{counts['recompiles']}".rjust(26)
            kernel_ratio = r["kernels"] / result["bare"]["kernels"]
            print(f"{row:<7}{loop:<10}{r['ops']:>9.0f}{syncs:>7.1f}{r['copy_bytes'] / 1024:>10.1f}{ratio:>7.3f}"
                  f"{r['kernels']:>9.0f}{kernel_ratio:>7.3f}{dynamo}   {'yes' if syncs else 'no'}")
            lines = list(r["syncs"].items())
            for where, count in lines[:8]:
                print(f"{'':<17}{count:>5.1f} x {where}")
            if len(lines) > 8:
                print(f"{'':<17}{sum(c for _, c in lines[8:]):>5.1f} x at {len(lines) - 8} more lines")
            if compiled:
                for reason, count in r["dynamo"]["break_reasons"].items():
                    print(f"{'':<17}{count:>5d} x graph break: {reason[:120]}")
    ssl = worst_ratio(results, SELF_SUPERVISED)
    supervised = worst_ratio(results, ("zero0", "zero1", "zero2"))
    if ssl is not None:  # the last line when no supervised row ran
        print(f"{'ssl' if supervised is not None else 'ratio'} {ssl:.3f} (the worst self-supervised ops ratio, "
              f"{' '.join(SELF_SUPERVISED)}, vitscale / bare loop; goal <= 1.15)")
    if supervised is not None:  # the last line
        print(f"ratio {supervised:.3f} (the worst supervised ops ratio at ZeRO 0-2, vitscale / bare loop; "
              f"goal <= 1.05)")


def main(argv: list[str] | None = None) -> int:
    from pretrain.processes import spawn_local

    argv = list(sys.argv[2:] if argv is None else argv)
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if "WORLD_SIZE" in os.environ:
        worker(args)
        return 0
    if args.steps < WARMUP_STEPS + 2:
        print(f"--steps: at least {WARMUP_STEPS + 2} ({WARMUP_STEPS} warm-up steps, a counted one, a logging one)",
              file=sys.stderr)
        return 2
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for row in args.rows:
            out = Path(tmp) / f"{row}.json"
            nproc = args.nproc if row in ("zero1", "zero2", "zero3") else 1
            code = spawn_local(nproc, "pretrain.bench", ["ops", *argv, "--row", row, "--out", str(out)])
            if not out.exists():
                return code or 1
            results[row] = json.loads(out.read_text())
    report(results, args.nproc, args.compile)
    return 0
