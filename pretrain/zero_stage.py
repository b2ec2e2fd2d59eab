"""``engine.zero_stage: auto``: the lowest ZeRO stage whose model states and activations fit this
run's devices, chosen by every rank when a run starts (:func:`resolve_zero_stage`, from the trainer)
with the memory model of :mod:`pretrain.engine.memory_model`, which ``python -m pretrain.bench
memory`` checks against what DeepSpeed allocates.

The lowest stage that fits costs least: ZeRO-1/2 move as many bytes as ZeRO-0's all-reduce (a
reduce-scatter of the gradients, an all-gather of the updated weights) with a partition's
bookkeeping; ZeRO-3 moves half as much again, gathering every layer's weights in the forward and
backward passes. What each stage needs is its model states (for the run's trainable and momentum-teacher
parameters, world size, weight precision and offload) plus one micro-batch's activations; it fits
when that is at most :data:`MEMORY_MARGIN` of the device memory one rank may use: on a GPU the free
memory of its device (shared by the ranks on it), on a CPU the host's available memory over the ranks
on the host; the smallest of all ranks' decides, so that every rank chooses the same stage. When no
stage fits, ZeRO-3 (the least memory) is chosen with a warning.

- ``engine.offload``: ``optimizer`` leaves stages 1-3 to choose from, ``all`` and ``engine.offload_path``
  only ZeRO-3 (the stages each works with; the offloaded state is not on the device).
- ``engine.autocast``: ``auto`` means fp32 weights at ZeRO 0-2 and DeepSpeed's 16-bit weights at
  ZeRO-3 (bf16 only: fp16 never autocasts), so each stage is weighed in the precision it would run in.
- A run that resumes keeps the stage its checkpoints were written with, the number the run dir's
  ``config.yaml`` records: a checkpoint of ZeRO-0, ZeRO-1/2 or ZeRO-3 does not load at a stage of
  another of these three groups (DeepSpeed looks for files that are not there), and a machine with more
  or less free memory than the last time would otherwise choose another. The reason line says what a
  fresh start would choose.

The chosen stage replaces ``auto`` in the run's config (``config.yaml``), and ``run.json`` records it
with the reason, which rank 0 also logs.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import re
import socket
from collections import Counter
from pathlib import Path

import torch
import yaml

from pretrain.config import load_yaml
from pretrain.dist import DistEnv
from pretrain.engine.memory_model import (AUTOCAST_COPY_BYTES, activation_bytes, frozen_bytes, model_state_bytes,
                                          teacher_state_bytes)
from pretrain.engine.precision import autocasts
from pretrain.sections import Config
from pretrain.state.layout import CHECKPOINTS_DIR, LATEST_NAME

log = logging.getLogger(__name__)

# The share of the memory a rank may use that the estimate may fill. The rest is for what the model
# leaves out: the allocator's fragmentation, DeepSpeed's communication buckets, kernels' workspaces
# (cuBLAS, attention), the batches on their way in, and the heads' activations.
MEMORY_MARGIN = 0.9

AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class Workload:
    """What a run trains, as far as its memory goes."""

    trainable: int  # parameters
    frozen: int  # a momentum teacher's parameters (each with its fp32 EMA state)
    block_units: list[int]  # tokens x channels at each transformer block one sample's views pass through
    micro_batch: int  # samples per rank and step
    precision: str  # engine.precision
    checkpointing: bool  # model.grad_checkpointing

    def activations(self, autocast: bool) -> int:
        """One micro-batch's activations, with autocast's 16-bit copies of the weights when it casts."""
        casts = autocast and self.precision != "fp32"
        return (activation_bytes(self.block_units, self.micro_batch, self.precision == "fp32", self.checkpointing)
                + (AUTOCAST_COPY_BYTES * self.trainable if casts else 0))


@dataclasses.dataclass(frozen=True)
class Budget:
    """The device memory one rank may use (the smallest of every rank's), and where that is."""

    bytes: int
    # "free on cuda:0", "on the CPU (31.2 GiB available / 2 processes)"; naming the host when there are several
    where: str


@dataclasses.dataclass(frozen=True)
class ZeroStageChoice:
    stage: int
    reason: str  # one line, for the log and run.json
    fits: bool  # False: no stage fits (ZeRO-3 chosen) or the kept stage does not


def fp32_weights(stage: int, precision: str, autocast) -> bool:
    """Whether ``stage`` keeps fp32 weights: engine.precision fp32, or autocast as a run at that stage
    would resolve it (:func:`pretrain.engine.precision.autocasts`: bf16 only, ``auto`` below ZeRO-3)."""
    return precision == "fp32" or autocasts(precision, autocast, stage)


def candidate_stages(offload: str, offload_path: str | None) -> tuple[int, ...]:
    """The stages ``auto`` chooses from, given the offload settings (module docstring)."""
    if offload == "all" or offload_path is not None:
        return (3,)
    return (1, 2, 3) if offload == "optimizer" else (0, 1, 2, 3)


def needs(work: Workload, stage: int, world_size: int, autocast, offload: str) -> tuple[int, int]:
    """(model states, activations) in bytes on one rank at ``stage``."""
    fp32 = fp32_weights(stage, work.precision, autocast)
    states = (model_state_bytes(stage, world_size, fp32, offload).total * work.trainable
              + (frozen_bytes(stage, world_size, fp32) + teacher_state_bytes(stage, world_size)) * work.frozen)
    return int(states), work.activations(fp32)


def choose_zero_stage(work: Workload, world_size: int, budget: Budget, autocast=AUTO, offload: str = "none",
                      offload_path: str | None = None, kept: int | None = None) -> ZeroStageChoice:
    """The lowest of :func:`candidate_stages` whose needs fit ``MEMORY_MARGIN x budget``, and why; or
    ``kept``, the stage of the checkpoints a run resumes, saying what a fresh start would choose."""
    limit = MEMORY_MARGIN * budget.bytes
    said = []

    def weigh(stage: int) -> bool:
        states, activations = needs(work, stage, world_size, autocast, offload)
        fits = states + activations <= limit
        what = (f"{size(states)} of model states + {size(activations)} activations" if not said else
                f"{size(states)} + {size(activations)}")
        said.append(f"ZeRO-{stage} needs {what} {'<=' if fits else '>'} {MEMORY_MARGIN:g} x {size(budget.bytes)}"
                    + ("" if len(said) else f" {budget.where}"))
        return fits

    candidates = candidate_stages(offload, offload_path)
    stage = next((s for s in candidates if weigh(s)), None)
    if stage is not None:
        reason, fits = f"ZeRO-{stage} ({'; '.join(said)})", True
    else:
        stage, fits = candidates[-1], False
        reason = (f"ZeRO-{stage}, the least memory, though no stage fits ({'; '.join(said)}): set "
                  f"model.grad_checkpointing=true, a smaller data.batch_size or engine.offload")
    if kept in candidates and kept != stage:  # a stage the offload settings rule out is not kept
        said.clear()
        fits = weigh(kept)
        reason = (f"ZeRO-{kept}, the stage of the checkpoints this run resumes ({said[0]}); a fresh start would "
                  f"choose {reason}")
        stage = kept
    return ZeroStageChoice(stage, f"engine.zero_stage=auto: {reason}", fits)


def size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# -- the run's side: its workload, its devices, its checkpoints ---------------------------------------
def resolve_zero_stage(cfg: Config, dist: DistEnv, ctx) -> tuple[Config, ZeroStageChoice | None]:
    """``cfg`` with ``engine.zero_stage: auto`` replaced by the chosen stage, and the choice (None when
    the config names a stage). ``ctx``: the objective's RunContext. A collective: every rank calls it."""
    if cfg.engine.zero_stage != AUTO:
        return cfg, None
    e = cfg.engine
    choice = choose_zero_stage(measure_workload(cfg, ctx), dist.world_size, device_budget(dist),
                               e.autocast, e.offload, e.offload_path, recorded_stage(cfg))
    if dist.is_main:
        log.log(logging.INFO if choice.fits else logging.WARNING, "%s", choice.reason)
    return dataclasses.replace(cfg, engine=dataclasses.replace(e, zero_stage=choice.stage)), choice


def recorded_stage(cfg: Config) -> int | None:
    """The ZeRO stage a run that resumes a checkpoint was written with (its run dir's config.yaml, which
    records the resolved stage); None for a run that starts afresh or records none."""
    run_dir = Path(cfg.run.dir)
    checkpoints = run_dir / CHECKPOINTS_DIR
    resumes = (checkpoints / LATEST_NAME).is_file() or \
        (cfg.train.resume_from is not None and (checkpoints / cfg.train.resume_from).is_dir())
    if not (cfg.train.resume and resumes):
        return None
    try:
        stage = (load_yaml((run_dir / "config.yaml").read_text()) or {}).get("engine", {}).get("zero_stage")
    except (OSError, yaml.YAMLError, AttributeError):  # unreadable: choose as for a fresh start
        return None
    return stage if stage in (0, 1, 2, 3) and not isinstance(stage, bool) else None


def measure_workload(cfg: Config, ctx) -> Workload:
    """The objective's parameters and the transformer blocks its training views pass through, from a
    build on the meta device (no memory, no arithmetic)."""
    from pretrain.models.backbone import on_meta_device
    from pretrain.objectives.build import build_objective

    alone = dataclasses.replace(ctx, dist=DistEnv(world_size=ctx.dist.world_size))  # no collectives while built
    with torch.random.fork_rng(devices=[]):  # the run's own build draws the same initial weights
        objective = on_meta_device(lambda: build_objective(cfg, alone))
    trainable = sum(p.numel() for p in objective.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in objective.parameters() if not p.requires_grad)
    units = []
    for (height, width), count in view_sizes(objective, cfg.data.image_size).items():
        units += block_units(objective.backbone(), height, width) * count
    return Workload(trainable, frozen, units, cfg.data.batch_size, cfg.engine.precision, cfg.model.grad_checkpointing)


def view_sizes(objective, image_size: int) -> dict[tuple[int, int], int]:
    """{(height, width): images} of one sample's training views (a grey JPEG through the objective's
    view); one image of ``image_size`` when the view leaves decoding to the device."""
    from PIL import Image

    from pretrain.data.decode import decode

    view = objective.train_view()
    encoded = io.BytesIO()
    Image.new("RGB", (image_size, image_size), (128, 128, 128)).save(encoded, "JPEG")
    image, _ = decode({"__key__": "size", "jpg": encoded.getvalue(), "cls": b"0"},
                      lazy=bool(getattr(view, "decodes_itself", False)))
    sizes: Counter = Counter()
    for value in view(image).values():
        if torch.is_tensor(value) and value.ndim >= 3 and value.shape[-3] == 3:
            sizes[tuple(value.shape[-2:])] += math.prod(value.shape[:-3])
    return dict(sizes) or {(image_size, image_size): 1}


BLOCK_NAME = re.compile(r"(^|\.)blocks\.\d+$")  # timm's ViT blocks.N, Swin's layers.M.blocks.N


def block_units(backbone: torch.nn.Module, height: int, width: int) -> list[int]:
    """Tokens x channels at the output of each transformer block for one image of height x width
    (a forward pass on the meta device); empty when an operation has no meta kernel."""
    found: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: found.append(out.numel() // out.shape[0]))
             for name, m in backbone.named_modules() if BLOCK_NAME.search(name)]
    try:
        with torch.no_grad():
            backbone(torch.empty(1, 3, height, width, device="meta"))
    except NotImplementedError:
        log.warning("model.name: its forward pass has an operation without a meta kernel; engine.zero_stage=auto "
                    "leaves its activations out")
        return []
    finally:
        for hook in hooks:
            hook.remove()
    return found


def device_budget(dist: DistEnv) -> Budget:
    """The memory one rank may use: the smallest of every rank's (a collective)."""
    if dist.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dist.device)
        device = str(dist.device)
    else:
        import psutil

        free, device = psutil.virtual_memory().available, "cpu"
    everyone = dist.gather_objects((socket.gethostname(), device, int(free)))
    sharing = Counter((host, where) for host, where, _ in everyone)
    several_hosts = len({host for host, _, _ in everyone}) > 1
    host, where, free = min(everyone, key=lambda r: r[2] // sharing[r[0], r[1]])
    ranks = sharing[host, where]
    on_host = f" of {host}" if several_hosts else ""
    if where == "cpu":
        text = f"on the CPU{on_host} ({size(free)} available / {ranks} process{'es' * (ranks > 1)})"
    elif ranks > 1:
        text = f"on {where}{on_host} ({size(free)} free / {ranks} processes)"
    else:
        text = f"free on {where}{on_host}"
    return Budget(free // ranks, text)
