"""Model-state memory per rank against ZeRO's theory, on N processes; activations against their estimate.

    python -m pretrain.bench memory [--model vit_base_patch16_224] [--zero 0 1 2 3] [--offload none]
                                    [--autocast false|true] [--objective supervised|dino] [--nproc 2] ...

For each ZeRO stage given, one run of a few training steps (synthetic batches, AdamW) on ``--nproc``
processes, with the weights of ``--autocast``'s mode: ``false``, DeepSpeed's 16-bit weights
(``--precision``) with fp32 masters; ``true``, fp32 weights, as ``engine.autocast: true`` keeps them
(run as ``engine.precision=fp32``, whose model states are the same; the compute is fp32 too). Then,
on every rank, memory per parameter:

- ``tensors``: bytes of every live tensor storage on the device (found through the garbage
  collector, each storage counted once, the parameters' gradients included) at the peak of the model
  states: the larger of when the last step's backward pass has made its last gradient (ZeRO-1 then
  holds whole gradients) and just before the last optimizer step: the weights (whole, or this rank's
  ZeRO-3 partition), gradients, fp32 master weights and Adam's two moments (``optim.``: those two),
  communication buckets, buffers;
- ``process``: the accelerator's allocated memory (on a CPU, the process's resident memory)
  after the steps, less what it was before the model was built; ``peak``: the most it reached,
  less the same baseline (on a CPU, the process's peak resident set);

next to ``theory``, the memory model's bytes per parameter for the mode run
(:mod:`pretrain.engine.memory_model`, which ``engine.zero_stage: auto`` chooses with; ZeRO's paper
for the 16-bit weights: 16 at ZeRO-0, 4 + 12/N at ZeRO-1, 2 + 14/N at ZeRO-2, 16/N at ZeRO-3), plus,
for DINO, the momentum teacher: its compute copy and its fp32 state (4 bytes) per teacher parameter,
partitioned at ZeRO-3; the theory of both modes (``autocast=true``, ``=false``); and DeepSpeed's own
estimate for the stage (``estimate_zero2/3_model_states_mem_needs``, which counts 18 bytes per
parameter: fp32 gradients too). Bytes per parameter are over the trainable parameters. The worst
rank is shown. ``act.``: the bytes the last step's forward pass saved for its backward (torch's
saved-tensor hooks; the parameters themselves left out) in MiB, next to the memory model's estimate
(``act. est.``). The last line is ``tensors`` over the theory at the highest stage run.

DeepSpeed's bucket sizes are fixed element counts made for GPUs (a gradient bucket of 500M
elements is 1 GB per rank whatever the model); by default (``--deepspeed lean``) they are sized to
the model instead (``lean_buckets``); ``--deepspeed '{}'`` keeps DeepSpeed's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

import torch

from pretrain.dist import init_distributed, leave_process_group
from pretrain.engine.memory_model import frozen_bytes, model_state_bytes, teacher_state_bytes
from pretrain.processes import spawn_local

OFFLOADS = ("none", "optimizer", "all")


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m pretrain.bench memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name")
    p.add_argument("--kwargs", default="{}", help="model.kwargs, YAML (e.g. '{depth: 4}')")
    p.add_argument("--objective", default="supervised", choices=["supervised", "dino"])
    p.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    p.add_argument("--offload", default="none", choices=OFFLOADS, help="engine.offload (ZeRO-Offload)")
    p.add_argument("--autocast", default="false", choices=["false", "true"],
                   help="the weights' mode: false, DeepSpeed's 16-bit weights (--precision) with fp32 masters; true, "
                        "fp32 weights (as engine.autocast=true keeps them)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16"], help="the 16-bit weights' type")
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=2, help="per-process batch")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps before measuring")
    p.add_argument("--no-zero-init", action="store_true", help="ZeRO-3: build the whole model, then partition it")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--deepspeed", default="lean", help="engine.deepspeed, YAML: raw DeepSpeed settings; 'lean' "
                   "(default): buckets sized to the model (lean_buckets); '{}': DeepSpeed's defaults")
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)  # a worker's result file
    return p.parse_args(argv)


def deepspeed_estimate(stage: int, params: int, largest_layer: int, ranks: int, offload: str) -> int | None:
    """DeepSpeed's estimate of one device's model-state bytes for this stage (None for ZeRO-0)."""
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, device, _ = estimate_zero3_model_states_mem_needs(
            params, largest_layer, num_gpus_per_node=ranks, num_nodes=1, cpu_offload=offload != "none",
            cpu_offload_params=offload == "all", zero_init=True)
        return device
    if stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, device = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=ranks, num_nodes=1,
                                                          cpu_offload=offload != "none")
        return device
    return None


MASTER_ATTRIBUTES = ("fp32_partitioned_groups_flat",  # ZeRO-3
                     "single_partition_of_fp32_groups",  # ZeRO-1/2
                     "fp32_groups_flat_partition",  # bf16 without ZeRO
                     "fp32_groups_flat", "fp32_groups")  # fp16 without ZeRO


def live_tensor_bytes(device: torch.device, optimizer, module: torch.nn.Module) -> dict[str, int]:
    """Bytes of the live tensor storages on ``device``, each counted once: all of them ("total"; the
    parameters' gradients too, which Python may not hold), and those of the optimizer's state and the
    fp32 master weights it steps ("optimizer")."""
    def storages(tensors):
        found = {}
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type == device.type and not t.is_meta:
                storage = t.untyped_storage()
                found[storage.data_ptr()] = storage.nbytes()
        return found

    gc.collect()
    everything = storages([o for o in gc.get_objects() if torch.is_tensor(o)] + [p.grad for p in module.parameters()])
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's wrapper holds the torch optimizer
    owned = [v for state in inner.state.values() for v in state.values()]
    for name in MASTER_ATTRIBUTES:
        for item in getattr(optimizer, name, None) or []:
            owned += item if isinstance(item, (list, tuple)) else [item]
    return {"total": sum(everything.values()), "optimizer": sum(storages(owned).values())}


class SavedForBackward:
    """Bytes of the tensors autograd saves for the backward pass while this context is open, each
    storage counted once, the parameters left out (they are model states)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.seen: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if not isinstance(t, torch.nn.Parameter) and storage.data_ptr() not in self.parameters and not t.is_meta:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self.hooks.__exit__(*exc)


def lean_buckets(args) -> str:
    """DeepSpeed settings sized to the model rather than to DeepSpeed's defaults, which are fixed
    element counts for GPUs (a 500M-element gradient bucket, 1G live parameters): each bucket, and
    the parameters ZeRO-3 may keep gathered, hold twice the largest parameter."""
    import timm
    import yaml

    from pretrain.models.backbone import on_meta_device

    model = on_meta_device(lambda: timm.create_model(args.model, img_size=args.image_size,
                                                     **yaml.safe_load(args.kwargs)))
    size = 2 * max(p.numel() for p in model.parameters())
    return json.dumps({"zero_optimization": {
        "reduce_bucket_size": size, "allgather_bucket_size": size, "stage3_prefetch_bucket_size": size,
        "stage3_max_live_parameters": size, "stage3_max_reuse_distance": size, "sub_group_size": 4 * size}})


def process_bytes(device: torch.device) -> tuple[int, int]:
    """(current, peak) memory: the accelerator's allocated bytes, or on a CPU the resident set."""
    if device.type == "cpu":
        import psutil

        return psutil.Process().memory_info().rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return accelerator.memory_allocated(), accelerator.max_memory_allocated()


def mode_overrides(args) -> list[str]:
    """The config keys of ``--autocast``'s mode. fp32 weights are engine.precision=fp32 here: the
    model states engine.autocast=true holds (its compute in 16 bits adds no state)."""
    return ["engine.precision=fp32"] if args.autocast == "true" else [f"engine.precision={args.precision}"]


def worker(args) -> None:
    from pretrain.config import load_config
    from pretrain.engine import partitioned_numel
    from pretrain.objectives.base import RunContext
    from pretrain.trainer import Trainer
    from pretrain.zero_stage import measure_workload

    dist = init_distributed()
    torch.set_num_threads(args.threads)
    baseline, _ = process_bytes(dist.device)
    overrides = [
        f"run.dir={Path(args.out).parent / 'run'}", "data.synthetic=true", "data.num_classes=1000",
        "data.workers=0", f"data.image_size={args.image_size}", f"data.batch_size={args.batch}",
        f"model.name={args.model}", f"model.kwargs={args.kwargs}", "model.drop_path=0",
        f"model.grad_checkpointing={str(args.grad_checkpointing).lower()}", f"objective.name={args.objective}",
        f"engine.zero_stage={args.stage}", *mode_overrides(args), f"engine.offload={args.offload}",
        f"engine.zero_init={str(not args.no_zero_init).lower()}", f"engine.deepspeed={args.deepspeed}",
        f"train.steps={args.steps}", "train.ckpt_every=0", "train.export=false", "train.progress=false",
        "train.resume=false", f"train.log_every={args.steps}", "optim.lr=1e-4"]
    if args.objective == "supervised":
        overrides += ["objective.mixup=0", "objective.cutmix=0", "objective.reprob=0"]
    else:
        overrides += ["objective.local_crops=0", "objective.out_dim=4096", "objective.hidden_dim=512"]
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, dist)
    trainer.save = lambda: None  # memory is measured, not checkpoint writes
    engine, module = trainer.engine, trainer.objective
    last = args.steps - 1
    held: dict[str, int] = {}
    saved = SavedForBackward(module)

    def keep_largest(found: dict[str, int]) -> None:
        if found["total"] > held.get("total", -1):
            held.update(found)

    backward_ends = []

    def at_backward_end() -> None:
        """The last step's backward pass has made every gradient; ZeRO-0/1 hold them whole (reduced after)."""
        keep_largest(live_tensor_bytes(dist.device, engine.engine.optimizer, module))

    def on_first_gradient(_param) -> None:
        if trainer.step == last and not backward_ends:
            backward_ends.append(True)
            torch.autograd.Variable._execution_engine.queue_callback(at_backward_end)

    for p in module.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(on_first_gradient)
    forward, step = engine.forward, engine.step

    def measured_forward(*inputs, **kwargs):
        if trainer.step != last:
            return forward(*inputs, **kwargs)
        with saved:
            return forward(*inputs, **kwargs)

    def measured_step(skip: bool = False, measure_grad_norm: bool = False) -> float | None:
        """Before the last optimizer step, when the gradients (or their partitions) are held too."""
        if trainer.step == last:
            keep_largest(live_tensor_bytes(dist.device, engine.engine.optimizer, module))
        return step(skip, measure_grad_norm)

    engine.forward, engine.step = measured_forward, measured_step
    trainer.fit()
    params = list(module.parameters())
    trainable = sum(partitioned_numel(p) for p in params if p.requires_grad)
    frozen = sum(partitioned_numel(p) for p in params if not p.requires_grad)
    followed = _teacher_followed(module)
    largest = max(sum(partitioned_numel(p) for p in m.parameters(recurse=False)) for m in module.modules())
    plan = trainer.plan
    work = measure_workload(trainer.cfg, RunContext(plan.num_classes, plan.total_steps, plan.steps_per_epoch, dist,
                                                    cfg.engine.precision))
    estimate = work.activations(autocast=False)  # fp32 weights here are engine.precision=fp32: nothing cast
    current, peak = process_bytes(dist.device)
    mine = {"rank": dist.rank, **held, "process": current - baseline, "peak": peak - baseline, "baseline": baseline,
            "activations": saved.bytes}
    everyone = [None] * dist.world_size
    torch.distributed.all_gather_object(everyone, mine)
    if dist.is_main:
        Path(args.out).write_text(json.dumps({"ranks": everyone, "trainable": trainable, "frozen": frozen,
                                              "teacher_followed": followed, "largest_layer": largest,
                                              "world_size": dist.world_size, "activation_estimate": estimate}))


def _teacher_followed(objective) -> int:
    """Parameters whose fp32 EMA a momentum teacher keeps (0 without a teacher)."""
    for module in objective.modules():
        if hasattr(module, "_numels") and hasattr(module, "master"):
            return sum(module._numels)
    return 0


def theory_bytes(stage: int, ranks: int, result: dict, autocast: bool, offload: str) -> float:
    """Model states of one rank (pretrain.engine.memory_model): the trainable parameters', plus a
    momentum teacher's compute copy and fp32 state."""
    return (model_state_bytes(stage, ranks, autocast, offload).total * result["trainable"]
            + frozen_bytes(stage, ranks, autocast) * result["frozen"]
            + teacher_state_bytes(stage, ranks) * result["teacher_followed"])


def report(args, results: dict[int, dict]) -> None:
    first = next(iter(results.values()))
    trainable, ranks = first["trainable"], first["world_size"]
    autocast = args.autocast == "true"
    mode = "autocast=true (fp32 weights)" if autocast else f"autocast=false ({args.precision} weights, fp32 masters)"
    what = f"{args.objective} {args.model} {args.kwargs if args.kwargs != '{}' else ''}".strip()
    print(f"{what}: {trainable / 1e6:.1f}M trainable + {first['frozen'] / 1e6:.1f}M frozen parameters, "
          f"{ranks} ranks, {mode}, offload {args.offload}, zero.Init {'off' if args.no_zero_init else 'on'}, "
          f"{args.steps} steps at batch {args.batch} x {args.image_size} px; bytes per trainable parameter "
          f"on the worst rank (process memory less its {first['ranks'][0]['baseline'] / 2**30:.2f} GiB before the "
          f"build); activations per micro-batch in MiB")
    print(f"{'ZeRO':>4} {'theory':>8} {'DS est.':>8} {'tensors':>8} {'optim.':>7} {'process':>8} {'peak':>8} "
          f"{'tensors GiB':>12} {'ratio':>6} {'autocast=true':>14} {'autocast=false':>15} {'act. est.':>10} "
          f"{'act.':>8}")
    last = None
    for stage, result in results.items():
        worst = {k: max(r[k] for r in result["ranks"])
                 for k in ("total", "optimizer", "process", "peak", "activations")}
        theory = theory_bytes(stage, ranks, result, autocast, args.offload)
        modes = [theory_bytes(stage, ranks, result, fp32, args.offload) / trainable for fp32 in (True, False)]
        estimate = deepspeed_estimate(stage, trainable, result["largest_layer"], ranks, args.offload)
        shown_estimate = f"{estimate / trainable:8.2f}" if estimate else f"{'-':>8}"
        ratio = worst["total"] / theory
        print(f"{stage:>4} {theory / trainable:8.2f} {shown_estimate} {worst['total'] / trainable:8.2f} "
              f"{worst['optimizer'] / trainable:7.2f} {worst['process'] / trainable:8.2f} "
              f"{worst['peak'] / trainable:8.2f} {worst['total'] / 2**30:12.2f} {ratio:6.3f} {modes[0]:14.2f} "
              f"{modes[1]:15.2f} {result['activation_estimate'] / 2**20:10.2f} {worst['activations'] / 2**20:8.2f}")
        last = (stage, ratio, worst["process"] / theory)
    stage, ratio, process_ratio = last
    print(f"ratio {ratio:.3f} (ZeRO-{stage}: live tensor bytes over the theory of {mode}; process memory over the "
          f"theory {process_ratio:.3f}; goal: within 10%)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[2:] if argv is None else argv)
    args = parse(argv)
    if args.deepspeed == "lean":
        args.deepspeed = lean_buckets(args)
    if "WORLD_SIZE" in os.environ:
        args.stage = int(os.environ["VITSCALE_BENCH_STAGE"])
        worker(args)
        leave_process_group()
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.zero:
            out = Path(tmp) / f"zero{stage}" / "result.json"
            out.parent.mkdir()
            os.environ["VITSCALE_BENCH_STAGE"] = str(stage)
            code = spawn_local(args.nproc, "pretrain.bench", ["memory", *argv, "--deepspeed", args.deepspeed,
                                                              "--out", str(out)])
            if not out.exists():
                return code or 1
            if code != 0:  # after rank 0 wrote the results: a rank that failed while leaving the group
                print(f"note: ZeRO-{stage}: the ranks exited with code {code} after measuring", file=sys.stderr)
            results[stage] = json.loads(out.read_text())
    report(args, results)
    return 0
