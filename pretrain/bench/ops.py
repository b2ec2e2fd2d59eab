"""The work of one training step, counted: vitscale's step against a bare loop doing the same maths.

    python -m pretrain.bench ops [--rows zero0 zero1 zero2 zero3 dino] [--steps 4] [--threads 1]

Every aten op the step dispatches is a kernel launch a GPU waits for, and every read of a device
value on the host (``item``, ``tolist``, ``bool`` of a tensor) stalls the GPU's queue; both can be
counted on a CPU. For each row, a few optimizer steps of vitscale's trainer (synthetic uint8 batches,
bf16) and of a bare loop run under a dispatch-counting mode; per steady-state step (the first is
warm-up, the last one logs) the table gives the ops dispatched, the host syncs (each with the line
that asked for it), the bytes copied, and the ratio of vitscale's ops to the bare loop's.

Rows: ``zero0`` to ``zero3``, supervised ViT-B/16 (32 px, batch 2) against a bare timm loop (autocast
bf16, fused AdamW; on 2 processes gradients averaged as DDP does), ZeRO 1-3 on ``--nproc``
processes; ``dino``, DINO ViT-S/16 with 2 global and 2 local crops against the same step as DINO's
``main_dino.py`` takes it. The last line, ``ratio``, is the worst supervised ops ratio at ZeRO 0-2.
"""

from __future__ import annotations

import argparse
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

ROWS = ("zero0", "zero1", "zero2", "zero3", "dino")
SYNC_OPS = {"_local_scalar_dense"}  # item(), float(t), bool(t): the host waits for the device's value
SYNC_METHODS = {"tolist", "numpy"}  # reads of a whole tensor on the host (no aten op on a CPU tensor)
COPY_OPS = {"copy_", "_to_copy"}
HERE = os.path.abspath(__file__)


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m pretrain.bench ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per loop (the first and last not counted)")
    p.add_argument("--nproc", type=int, default=2, help="processes for ZeRO 1-3")
    p.add_argument("--threads", type=int, default=1)
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

    def mark(self) -> None:
        self.steps.append({"ops": 0, "syncs": Counter(), "copy_bytes": 0})

    def sync(self, what: str) -> None:
        self.steps[-1]["syncs"][f"{what} at {caller()}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        step, name = self.steps[-1], func.overloadpacket.__name__
        step["ops"] += 1
        if name in SYNC_OPS:
            self.sync(name)
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
    counter = StepCounter()
    with HostReads(counter), counter:
        run(counter.mark)
    measured = counter.steps[2:steps]  # [0]: before the first step, [1]: the warm-up step, [steps]: the log step
    syncs = Counter()
    for step in measured:
        syncs.update(step["syncs"])
    n = max(len(measured), 1)
    return {"ops": sum(s["ops"] for s in measured) / n, "copy_bytes": sum(s["copy_bytes"] for s in measured) / n,
            "syncs": {k: v / n for k, v in syncs.most_common()}}


# -- vitscale ---------------------------------------------------------------------------------------------
SUPERVISED = ["model.name=vit_base_patch16_224", "data.image_size=32", "data.batch_size=2", "data.num_classes=1000",
              "objective.mixup=0", "objective.cutmix=0", "objective.reprob=0", "objective.label_smoothing=0"]
DINO = ["objective.name=dino", "model.name=vit_small_patch16_224", "model.kwargs.dynamic_img_size=true",
        "data.image_size=32", "data.batch_size=2", "data.num_classes=1000", "objective.local_crops=2",
        "objective.local_size=16",
        "objective.out_dim=4096", "train.clip_grad=3.0", "train.clip_mode=per_param"]


def vitscale_run(row: str, steps: int, run_dir: str, dist):
    from pretrain import hooks
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    stage = 0 if row == "dino" else int(row[-1])
    cfg = load_config(None, [*(DINO if row == "dino" else SUPERVISED), "data.synthetic=true", "data.workers=0",
                             "model.drop_path=0", f"engine.zero_stage={stage}", "engine.precision=bf16",
                             f"train.steps={steps}", f"train.log_every={steps}", "train.ckpt_every=0",
                             "train.export=false", "train.progress=false", "train.resume=false",
                             f"run.dir={run_dir}", "optim.lr=1e-4"])
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


# -- the bare loops -----------------------------------------------------------------------------------------
def bare_supervised_run(steps: int, dist):
    """A timm loop as a user writes it: fp32 weights, autocast bf16, fused AdamW, DDP-style averaging."""
    import torch.nn.functional as F

    from pretrain.data.transforms import normalize
    from pretrain.models.backbone import create_backbone
    from pretrain.config import ModelConfig

    torch.manual_seed(0)
    model = create_backbone(ModelConfig(name="vit_base_patch16_224", drop_path=0.0), 32, 1000).to(dist.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, device=dist.device)
    labels = torch.randint(0, 1000, (2,), device=dist.device)
    def average(param: torch.Tensor) -> None:  # DDP's averaging, one all-reduce per gradient (DDP buckets them)
        dist.all_reduce(param.grad.div_(dist.world_size))

    if dist.world_size > 1:
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(average)

    def run(mark):
        for _ in range(steps):
            mark()
            with torch.autocast(dist.device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(normalize(images, (0.5,) * 3, (0.5,) * 3, torch.float32)), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return run


def bare_dino_run(steps: int, dist):
    """DINO's main_dino.py step: student on every crop, teacher on the globals, DINO's loss, each
    parameter's gradient clipped, the last layer frozen in the first epoch, fused AdamW, a foreach EMA."""
    import timm
    import torch.nn.functional as F

    from pretrain.models.heads import DINOHead

    torch.manual_seed(0)

    def network():
        backbone = timm.create_model("vit_small_patch16_224", num_classes=0, img_size=32, dynamic_img_size=True,
                                     drop_path_rate=0.0)
        return torch.nn.ModuleDict({"backbone": backbone, "head": DINOHead(backbone.num_features, 4096)})
    student, teacher = network().to(dist.device), network().to(dist.device)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.04, fused=True)
    center = torch.zeros(1, 4096, device=dist.device)
    globals_ = [torch.rand(2, 3, 32, 32, device=dist.device) for _ in range(2)]
    locals_ = [torch.rand(2, 3, 16, 16, device=dist.device) for _ in range(2)]
    last_layer = [p for n, p in student.named_parameters() if "last_layer" in n]
    student_params, teacher_params = list(student.parameters()), list(teacher.parameters())

    def forward(net, crops):
        return torch.cat([net["head"](net["backbone"](c)) for c in crops])

    def run(mark):
        nonlocal center
        for _ in range(steps):
            mark()
            with torch.autocast(dist.device.type, dtype=torch.bfloat16):
                with torch.no_grad():
                    teacher_out = forward(teacher, globals_).float()
                student_out = forward(student, globals_ + locals_).float()
            targets = F.softmax((teacher_out - center) / 0.04, dim=-1).chunk(2)
            preds = F.log_softmax(student_out / 0.1, dim=-1).chunk(4)
            loss = sum(-(t * p).sum(-1).mean() for i, t in enumerate(targets) for j, p in enumerate(preds) if i != j) / 6
            loss.backward()
            for p in student_params:  # utils.clip_gradients
                if p.grad is not None:
                    p.grad.mul_(torch.clamp(3.0 / (p.grad.norm() + 1e-6), max=1.0))
            for p in last_layer:  # utils.cancel_gradients_last_layer, epoch 0
                p.grad = None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_mul_(teacher_params, 0.996)
                torch._foreach_add_(teacher_params, student_params, alpha=0.004)
                center = center * 0.9 + teacher_out.mean(0, keepdim=True) * 0.1
    return run


# -- one row --------------------------------------------------------------------------------------------------
def measure(row: str, steps: int, dist) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ours = counted(vitscale_run(row, steps, tmp, dist), steps)
    bare = counted(bare_dino_run(steps, dist) if row == "dino" else bare_supervised_run(steps, dist), steps)
    return {"vitscale": ours, "bare": bare}


def worker(args) -> None:
    from pretrain.dist import init_distributed, leave_process_group

    dist = init_distributed()
    result = measure(args.row, args.steps, dist)
    if dist.is_main:
        Path(args.out).write_text(json.dumps(result))
    leave_process_group()


def report(results: dict[str, dict], nproc: int) -> None:
    print(f"ops dispatched per optimizer step (steady state), host syncs and copy bytes; torch {torch.__version__}, "
          f"ZeRO 1-3 on {nproc} processes")
    print(f"{'row':<7}{'loop':<10}{'ops':>9}{'syncs':>7}{'copy KiB':>10}{'ratio':>7}   would sync the device")
    worst = None
    for row, result in results.items():
        bare_ops = result["bare"]["ops"]
        for loop in ("bare", "vitscale"):
            r = result[loop]
            syncs = sum(r["syncs"].values())
            ratio = r["ops"] / bare_ops
            print(f"{row:<7}{loop:<10}{r['ops']:>9.0f}{syncs:>7.1f}{r['copy_bytes'] / 1024:>10.1f}{ratio:>7.3f}   "
                  f"{'yes' if syncs else 'no'}")
            for where, count in list(r["syncs"].items())[:8]:
                print(f"{'':<17}{count:>5.1f} x {where}")
        if row in ("zero0", "zero1", "zero2"):
            ratio = result["vitscale"]["ops"] / bare_ops
            worst = ratio if worst is None else max(worst, ratio)
    if worst is not None:
        print(f"ratio {worst:.3f} (the worst supervised ops ratio at ZeRO 0-2, vitscale / bare loop; goal <= 1.05)")


def main(argv: list[str] | None = None) -> int:
    from pretrain.processes import spawn_local

    argv = list(sys.argv[2:] if argv is None else argv)
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if "WORLD_SIZE" in os.environ:
        worker(args)
        return 0
    if args.steps < 3:
        print("--steps: at least 3 (a warm-up step, a counted one, a logging one)", file=sys.stderr)
        return 2
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for row in args.rows:
            out = Path(tmp) / f"{row}.json"
            nproc = 1 if row in ("zero0", "dino") else args.nproc
            code = spawn_local(nproc, "pretrain.bench", ["ops", *argv, "--row", row, "--out", str(out)])
            if not out.exists():
                return code or 1
            results[row] = json.loads(out.read_text())
    report(results, args.nproc)
    return 0
