"""The DeepSpeed engine: the only module that imports deepspeed.

It translates the run config into a DeepSpeed config, wraps the objective with a torch AdamW whose
step can be skipped (for non-finite losses), sets the scheduled lr and weight decay on the
optimizer's groups, and saves, loads and gathers the fp32 master weights. Checkpoints are read
weights-only (:func:`weights_only_loading`): a file that would run code on load is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import pickle
import re
import shutil
from argparse import Namespace
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from pretrain.checkpoint import META_NAME, CheckpointError, file_checksum, verify_files
from pretrain.config import Config, ConfigError, merge
from pretrain.dist import DistEnv
from pretrain.files import atomic_write

log = logging.getLogger(__name__)


class _WithoutAcceleratorChoice(logging.Filter):
    """Drops DeepSpeed's own lines about which accelerator it picked ("Setting accelerator to CPU
    ... unable to detect it"): ``init_distributed`` says which device and backend the run uses."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.funcName != "get_accelerator"


def import_deepspeed():
    """DeepSpeed, imported on first use, so that commands which do not train (``--help``,
    ``--print-config``, config errors) never load it. Without a GPU it is told to use its CPU
    accelerator, as ``init_distributed`` does (gloo), instead of guessing aloud."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # The filter sits on DeepSpeed's logger before DeepSpeed configures it (it keeps filters).
    deepspeed_log = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _WithoutAcceleratorChoice) for f in deepspeed_log.filters):
        deepspeed_log.addFilter(_WithoutAcceleratorChoice())
    import deepspeed

    return deepspeed


@dataclass(frozen=True)
class MasterSlice:
    """The part of one parameter's fp32 master weights that this rank holds.

    ``values`` is a 1-D fp32 view of the optimizer's own storage (None when other ranks hold all
    of it), covering elements ``start:start + len(values)`` of the flattened parameter.
    ``partitioned`` (ZeRO-3): the parameter's compute copy is partitioned the same way, so
    ``local_shard`` of a same-shaped parameter lines up with ``values`` element for element.
    Under ZeRO-3 with the optimizer state on NVMe (``engine.offload_path``) the fp32 masters are on
    disk, swapped in a sub-group at a time inside the optimizer step; ``values`` is then the rank's
    partition of the compute copy (bf16 or fp16), the masters rounded once.
    """

    values: torch.Tensor | None
    start: int
    partitioned: bool


def local_shard(param: nn.Parameter) -> torch.Tensor:
    """The 1-D storage of ``param`` held on this rank: its ZeRO-3 partition, else all of it."""
    return param.ds_tensor.view(-1) if hasattr(param, "ds_tensor") else param.data.view(-1)


def refresh_gathered(params: list[nn.Parameter]) -> None:
    """After ZeRO-3 partitions were written outside the optimizer (a momentum teacher, a load),
    refresh the full copies DeepSpeed keeps of small "persistent" parameters; a collective. A
    no-op for other stages, whose parameters are not partitioned."""
    persistent = [p for p in params if getattr(p, "ds_persist", False)]
    if persistent:
        persistent[0].partition(persistent)  # drops the stale full copies, keeps the partitions
        persistent[0].all_gather(persistent)


def partitioned_numel(param: nn.Parameter) -> int:
    """The number of elements of ``param`` as built, also once ZeRO-3 partitioned it."""
    return param.ds_numel if hasattr(param, "ds_numel") else param.numel()


def zero_checkpoint_fp32_weights(directory: str | os.PathLike, tag: str) -> dict:
    """The fp32 weights of a DeepSpeed checkpoint with ZeRO optimizer states, gathered from its
    partitions by DeepSpeed's own ``zero_to_fp32`` (on its CPU accelerator without a GPU)."""
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)


def checkpoint_fp32_weights(directory: str | os.PathLike, tag: str) -> dict[str, torch.Tensor]:
    """The weights of DeepSpeed checkpoint ``directory/tag`` in fp32, whole: gathered from its ZeRO
    partitions, or (ZeRO stage 0, no optimizer-state files) its model states as saved. Call it inside
    :func:`weights_only_loading`."""
    tag_dir = Path(directory) / tag
    if any(tag_dir.glob("*optim_states.pt")):
        state = zero_checkpoint_fp32_weights(directory, tag)
        return {k: v for k, v in state.items() if torch.is_tensor(v)}
    files = sorted(tag_dir.glob("*model_states.pt"))
    if not files:
        raise CheckpointError(f"{tag_dir}: no DeepSpeed model states in this checkpoint")
    states = torch.load(files[0], map_location="cpu", weights_only=True)
    return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}


def is_partitioned(param: nn.Parameter) -> bool:
    """Whether ZeRO-3 holds ``param`` as partitions (its ``local_shard`` is a part of it)."""
    return hasattr(param, "ds_tensor")


def kept_whole(param: nn.Parameter) -> bool:
    """Whether ZeRO-3 also keeps ``param`` whole on every rank, next to its partition (small
    "persistent" parameters: biases, norms, tokens)."""
    return getattr(param, "ds_persist", False)


def partitioned_shape(param: nn.Parameter) -> torch.Size:
    """The shape of ``param`` as built, also once ZeRO-3 partitioned it."""
    return param.ds_shape if hasattr(param, "ds_shape") else param.shape


def builds_partitioned(cfg: Config) -> bool:
    """Whether :func:`build_module` partitions the parameters as the modules are built."""
    return cfg.engine.zero_stage == 3 and cfg.engine.zero_init


def build_module(make: Callable[[], nn.Module], cfg: Config, dist: DistEnv) -> nn.Module:
    """``make()``; under ZeRO-3 (with ``engine.zero_init``) inside ``deepspeed.zero.Init``, so that no
    rank ever holds the whole model: each module's parameters are partitioned as soon as that module
    is built, and at most one parameter is whole at a time (a rank holds 4/N bytes per parameter,
    then the compute dtype's 2/N, instead of 4 bytes for the whole model, before the engine starts).

    The weights come out exactly as an unpartitioned build makes them (every rank seeds the same
    generator): they are initialized in fp32, where model code initializes them (see
    :class:`_InPlaceOnWholeParameters`), and cast partition by partition to the compute dtype.
    """
    if not builds_partitioned(cfg):
        return make()
    # DeepSpeed's communication layer on the process group that is already up (its config reads the
    # world size from it); deepspeed.initialize does the same later.
    deepspeed = import_deepspeed()
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), dist_init_required=False)
    with deepspeed.zero.Init(config_dict_or_path=merge(deepspeed_config(cfg, dist.world_size), FP32_BUILD)), \
            _InPlaceOnWholeParameters():
        module = make()
    check_partition_dtypes(module, torch.float32, "as deepspeed.zero.Init built them")
    dtype = compute_dtype(cfg.engine.precision)
    if dtype != torch.float32:
        for param in module.parameters():
            if hasattr(param, "ds_tensor") and param.dtype != dtype:
                param.ds_tensor.data = param.ds_tensor.data.to(dtype)
                param.data = torch.empty(0, dtype=dtype, device=param.data.device)
        check_partition_dtypes(module, dtype, f"cast to engine.precision={cfg.engine.precision}'s compute dtype")
    return module


# zero.Init takes its dtype from this config (neither bf16 nor fp16: fp32), never from its ``dtype``
# argument: DeepSpeed 0.19.8's ``Init._set_dtype`` reads ``dtype or fp16 if fp16_supported else ...``,
# which Python groups as ``(dtype or fp16) if fp16_supported else (bf16 or fp32)``, so on an
# accelerator without fp16 (DeepSpeed's CPU accelerator on a CPU whose oneDNN has none) the argument
# is ignored and the weights are built in bf16. docs/scale.md says how to tell when this is fixed.
FP32_BUILD = {"bf16": {"enabled": False}, "fp16": {"enabled": False}}


def check_partition_dtypes(module: nn.Module, dtype: torch.dtype, when: str) -> None:
    """RuntimeError naming the first ZeRO-3 partition of ``module`` that is not in ``dtype``: a build
    in any other dtype would not equal the unpartitioned one."""
    for name, param in module.named_parameters():
        if hasattr(param, "ds_tensor") and param.ds_tensor.dtype != dtype:
            import deepspeed

            raise RuntimeError(f"engine.zero_init: parameter {name!r} is {param.ds_tensor.dtype}, not {dtype}, "
                               f"{when} (DeepSpeed {deepspeed.__version__}); the partitioned build would differ "
                               f"from an unpartitioned one. engine.zero_init=false builds the model whole on "
                               f"each rank instead")


class _InPlaceOnWholeParameters(TorchFunctionMode):
    """Runs each in-place operation on a ZeRO-3 partitioned parameter on the whole parameter.

    ``zero.Init`` partitions a module's parameters as soon as the module is built, but model code
    initializes most weights afterwards, from a parent's constructor (timm's ViT and Swin run
    ``trunc_normal_`` over every ``nn.Linear`` from the model's ``init_weights``). On a partitioned
    parameter, whose storage is empty, such an initializer would do nothing and draw no random
    numbers: the weights would differ from an unpartitioned build. Here the parameter is gathered,
    the operation runs on it whole (each rank draws the same numbers from the same seed), and it is
    partitioned again, keeping this rank's part; one parameter at a time is whole.
    """

    NOT_DATA = frozenset({"requires_grad_", "share_memory_"})  # in-place on flags, not on values

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else None
        name = getattr(func, "__name__", "")
        in_place = name == "__setitem__" or (name.endswith("_") and not name.startswith("_")
                                             and name not in self.NOT_DATA)
        if not (in_place and isinstance(target, nn.Parameter) and hasattr(target, "ds_status")):
            return func(*args, **kwargs)
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if target.ds_status != ZeroParamStatus.NOT_AVAILABLE:
            return func(*args, **kwargs)
        target.all_gather()
        try:
            return func(*args, **kwargs)
        finally:
            target.partition(has_been_updated=True)


class SkipAndFreeze:
    """An optimizer mixin that leaves weights and moments untouched while ``skip`` is set, and
    always leaves alone the param groups marked ``frozen``.

    DeepSpeed's ZeRO wrappers call the inner optimizer once per parameter sub-group, so the flag
    is held for the whole of one ``engine.step()`` rather than consumed by the first call. A frozen
    group is treated as torch treats parameters without a gradient: no update, no weight decay,
    moments and step count untouched. (ZeRO hands its flat partitions a zero gradient instead of
    none, which would still decay the weights and age the step count.)
    """

    skip = False

    def step(self, closure=None):
        if self.skip:
            return None
        groups = self.param_groups
        if not any(g.get("frozen") for g in groups):
            return super().step(closure)
        self.param_groups = [g for g in groups if not g.get("frozen")]
        try:
            return super().step(closure)
        finally:
            self.param_groups = groups

    def state_dict(self):
        """The optimizer's state dict, with a state for every parameter: one that has none yet (a
        group frozen so far, DINO's last layer) gets the one its first step would create (zero
        moments, step 0), so numerics do not change. DeepSpeed's universal conversion, which
        re-shards a checkpoint for another number of processes, needs every group's moments
        (``KeyError: 'exp_avg'`` otherwise). ZeRO's wrappers call this with every group's
        partitions in place, ZeRO-3 included."""
        for group in self.param_groups:
            for param in group["params"]:
                if not self.state.get(param):
                    self.state[param] = self.first_state(param, group)
        return super().state_dict()

    def first_state(self, param: torch.Tensor, group: dict) -> dict:
        """The state the optimizer creates for ``param`` at its first step."""
        raise NotImplementedError


class SkippableAdamW(SkipAndFreeze, torch.optim.AdamW):
    """torch's AdamW (fused on GPUs), with :class:`SkipAndFreeze`."""

    def first_state(self, param: torch.Tensor, group: dict) -> dict:
        # torch's own lazy initialization (step's dtype and device follow fused/capturable), run on a
        # zero gradient that takes no memory; it reads nothing of the gradient's values.
        grad = param.grad
        param.grad = torch.zeros((), dtype=param.dtype, device=param.device).expand_as(param)
        try:
            self._init_group({**group, "params": [param]}, [], [], [], [], [], [])
        finally:
            param.grad = grad
        return self.state[param]


def make_optimizer(param_groups: list[dict], cfg: Config, dist: DistEnv) -> torch.optim.Optimizer:
    """AdamW with :class:`SkipAndFreeze`: torch's, or with ``engine.offload`` DeepSpeed's CPU Adam
    (a C++ op compiled on first use), which steps the offloaded fp32 state on the host several
    times faster than torch's; ZeRO-Offload's speed rests on it."""
    o = cfg.optim
    if cfg.engine.offload == "none":
        return SkippableAdamW(param_groups, lr=0.0, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                              fused=(dist.device.type == "cuda") or None)
    import_deepspeed()
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    class SkippableCPUAdam(SkipAndFreeze, DeepSpeedCPUAdam):
        def first_state(self, param: torch.Tensor, group: dict) -> dict:
            # As DeepSpeedCPUAdam.step creates it.
            dtype = torch.float if self.fp32_optimizer_states else param.dtype
            return {"step": 0, "exp_avg": torch.zeros_like(param.data, dtype=dtype, device="cpu"),
                    "exp_avg_sq": torch.zeros_like(param.data, dtype=dtype, device="cpu")}

    return SkippableCPUAdam(param_groups, lr=0.0, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                            adamw_mode=True)


def offload_config(cfg: Config) -> dict:
    """DeepSpeed's ``zero_optimization`` offload settings for ``engine.offload``."""
    e = cfg.engine
    if e.offload == "none":
        return {}
    target = {"device": "nvme", "nvme_path": e.offload_path} if e.offload_path else {"device": "cpu"}
    import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    # Page-locked host buffers speed up the copies to and from an accelerator; a CPU has none to make.
    target["pin_memory"] = get_accelerator().device_name() != "cpu"
    zero = {"offload_optimizer": dict(target)}
    if e.offload == "all":
        zero["offload_param"] = dict(target)
    return {"zero_optimization": zero}


def loss_scale_state(optimizer) -> tuple[float, float] | None:
    """(current, minimum) of DeepSpeed's dynamic fp16 loss scale; None without one (bf16, fp32, static).

    ZeRO's optimizers keep a ``DynamicLossScaler``; FP16_Optimizer (no ZeRO) a ``loss_scale_config``."""
    scaler = getattr(optimizer, "loss_scaler", None)
    if getattr(scaler, "dynamic", False):
        return float(scaler.cur_scale), float(scaler.min_scale)
    config = getattr(optimizer, "loss_scale_config", None)
    if getattr(config, "dynamic_loss_scale", False):
        return float(config.cur_scale), float(config.min_loss_scale)
    return None


def report_loss_scale_floor_in_trainer(optimizer) -> None:
    """ZeRO's fp16 loss scaler raises a bare Exception when it overflows at its minimum (FP16_Optimizer
    stays there, skipping steps silently); the trainer counts such steps and stops naming the step."""
    scaler = getattr(optimizer, "loss_scaler", None)
    if getattr(scaler, "dynamic", False):
        scaler.raise_error_at_min_scale = False


def deepspeed_safe_globals() -> list[type]:
    """The classes DeepSpeed pickles into its checkpoints besides tensors and containers: the loss
    scalers (ZeRO-1/2 and fp16 state), ZeRO's stage enum and fragment addresses (ZeRO optimizer
    states). Plain data holders: rebuilding them runs no code of the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loading():
    """Inside, every ``torch.load`` reads weights only, with :func:`deepspeed_safe_globals` allowed.

    DeepSpeed's loaders ask torch for full unpickling (``weights_only=False``), which runs whatever a
    file's pickle names; torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides that at every call site,
    DeepSpeed's own ``torch.load`` calls included. A refused file raises ``pickle.UnpicklingError``.
    """
    saved = {name: os.environ.get(name) for name in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD",
                                                      "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # torch refuses both set
    allowed = deepspeed_safe_globals()
    scoped = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    if scoped is None:
        torch.serialization.add_safe_globals(allowed)
    try:
        with scoped(allowed) if scoped is not None else nullcontext():
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def refused_file_error(path: str, error: Exception) -> CheckpointError:
    """The error for a checkpoint file that weights-only loading refused, naming the file."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # torch's message opens with advice to unpickle fully; the line naming what it refused says more.
    detail = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(error).__name__)
    return CheckpointError(f"{path}: refused: loading it would unpickle more than weights ({detail}), which could "
                           f"run code; vitscale loads checkpoints weights-only. Load only checkpoints you trust "
                           f"with DeepSpeed directly; nothing of this file was run")


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    micro, accum = cfg.data.batch_size, cfg.train.grad_accum
    generated = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        # Per-parameter clipping is the engine's own (Engine.clip_each_parameter); DeepSpeed clips the global norm.
        "gradient_clipping": (cfg.train.clip_grad or 0.0) if cfg.train.clip_mode == "global" else 0.0,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "bf16": {"enabled": cfg.engine.precision == "bf16"},
        "fp16": {"enabled": cfg.engine.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,  # a torch AdamW: fused on GPUs, portable on CPU
        "steps_per_print": 2**62,  # the trainer does the logging
        "wall_clock_breakdown": False,
    }
    return merge(merge(generated, offload_config(cfg)), cfg.engine.deepspeed)


# The DeepSpeed settings vitscale derives from its own keys (what each is, which keys to set instead):
# the data stream, the schedules, the checkpoints and config.yaml follow those keys, so engine.deepspeed
# may repeat them but not contradict them.
OWNED_KEYS = {
    "train_batch_size": ("the global batch: data.batch_size x train.grad_accum x processes",
                         "data.batch_size, data.global_batch or train.grad_accum"),
    "train_micro_batch_size_per_gpu": ("data.batch_size", "data.batch_size or data.global_batch"),
    "gradient_accumulation_steps": ("train.grad_accum", "train.grad_accum"),
    "zero_optimization.stage": ("engine.zero_stage", "engine.zero_stage"),
    "bf16.enabled": ("engine.precision", "engine.precision"),
    "fp16.enabled": ("engine.precision", "engine.precision"),
    "gradient_clipping": ("train.clip_grad, with train.clip_mode=global", "train.clip_grad and train.clip_mode"),
}


def check_deepspeed_overrides(cfg: Config, world_size: int) -> None:
    """ConfigError when ``engine.deepspeed`` sets one of :data:`OWNED_KEYS` to another value than the
    run's own keys give (a batch, a stage or a precision that the run would not record as its own)."""
    ours = deepspeed_config(dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, deepspeed={})), world_size)
    for dotted, (meaning, instead) in OWNED_KEYS.items():
        given, derived = _lookup(cfg.engine.deepspeed, dotted), _lookup(ours, dotted)
        if given is not _MISSING and given != derived:
            raise ConfigError(f"engine.deepspeed.{dotted}={given!r}: this run's is {derived!r} ({meaning}, on "
                              f"{world_size} processes); set {instead} instead")


_MISSING = object()


def _lookup(mapping: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(mapping, dict) or part not in mapping:
            return _MISSING
        mapping = mapping[part]
    return mapping


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the engine computes in for ``engine.precision`` (its fp32 masters aside)."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check_accelerator(precision: str) -> None:
    """ConfigError unless DeepSpeed's accelerator is the device the run computes on (``init_distributed``
    picks CUDA where torch sees it, else the CPU) and it can train in ``precision``."""
    import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator.device_name() != device:
        raise ConfigError(f"DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')!r}: DeepSpeed's accelerator is "
                          f"{accelerator.device_name()!r}, but this run computes on {device!r} (with the "
                          f"{'NCCL' if device == 'cuda' else 'gloo'} backend); unset DS_ACCELERATOR")
    supported = {"fp32": True, "bf16": accelerator.is_bf16_supported(), "fp16": accelerator.is_fp16_supported()}
    if not supported[precision]:
        raise ConfigError(f"engine.precision={precision!r}: not supported on {accelerator.device_name()} "
                          f"(supported here: {', '.join(k for k, ok in supported.items() if ok)})")


def check_offload(cfg: Config) -> None:
    """ConfigError when ``engine.offload_path`` (NVMe, ZeRO-Infinity) cannot work on this machine:
    DeepSpeed writes through its async_io op, which needs libaio to build."""
    if cfg.engine.offload_path is None:
        return
    import_deepspeed()
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        raise ConfigError(f"engine.offload_path={cfg.engine.offload_path!r}: offloading to NVMe needs DeepSpeed's "
                          f"async_io op, which cannot be built here (it needs libaio: apt install libaio-dev); "
                          f"use engine.offload without engine.offload_path (host memory)")


def compile_backbone(module: nn.Module) -> None:
    """torch.compile, in place, the backbone of ``module`` (an objective), else ``module`` itself.

    The backbone is where the time goes; the objective's own Python (Mixup, teachers, queues) stays
    eager. In place (``nn.Module.compile``), so parameter names, checkpoints and exports do not
    change. ``dynamic=False``: one graph per input shape (DINO's global and local crops make two).
    Under ZeRO-3, DeepSpeed's gather hooks are excluded from compilation (graph breaks per module).
    """
    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError("engine.compile=true: torch.compile is not supported by this Python or PyTorch build")
    target = module.backbone() if callable(getattr(module, "backbone", None)) else module
    target.compile(dynamic=False)


def keep_buffer_dtypes(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Floating buffers back in the dtype (and with the values) they had before ``deepspeed.initialize``.
    DeepSpeed before 0.19 casts them to bf16/fp16 with the parameters, 0.19 leaves them alone; the
    older cast would round a momentum teacher's fp32 masters (and batch-norm statistics) to bf16."""
    for name, buffer in module.named_buffers():
        original = before.get(name)
        if original is not None and buffer.dtype != original.dtype:
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner), attr, original.to(buffer.device))


def cast_attention_masks(module: nn.Module, dtype: torch.dtype) -> None:
    """Swin's shifted-window masks (float ``attn_mask`` buffers) in the parameters' dtype. DeepSpeed
    (0.18 on) casts parameters to bf16/fp16 but leaves buffers in fp32, so the relative-position bias
    (a parameter) and the mask disagree, and CUDA's fused attention refuses a bias whose dtype is not
    the query's (seen on an H200: "invalid dtype for bias")."""
    for layer in module.modules():
        mask = getattr(layer, "attn_mask", None)
        if isinstance(mask, torch.Tensor) and mask.is_floating_point() and mask.dtype != dtype:
            layer.attn_mask = mask.to(dtype)


class Engine:
    def __init__(self, module: nn.Module, param_groups: list[dict], cfg: Config, dist: DistEnv) -> None:
        self.cfg, self.dist = cfg, dist
        check_accelerator(cfg.engine.precision)
        check_offload(cfg)
        if cfg.engine.compile:
            compile_backbone(module)
        self.optimizer = make_optimizer(param_groups, cfg, dist)
        for group in self.optimizer.param_groups:
            group.setdefault("lr_scale", 1.0)
        self.ds_config = deepspeed_config(cfg, dist.world_size)
        # DeepSpeed's unfused mixed-precision wrapper (bf16/fp16 without ZeRO) steps the optimizer once on
        # zero gradients at start-up: Adam's step count would be one ahead and its first real update
        # 0.744x torch's. That step is skipped like any other.
        self.optimizer.skip = True
        buffers = {name: b for name, b in module.named_buffers() if b.is_floating_point()}
        try:
            self.engine, *_ = import_deepspeed().initialize(model=module, optimizer=self.optimizer,
                                                            config=self.ds_config, dist_init_required=False)
        finally:
            self.optimizer.skip = False
        self.module = self.engine.module
        keep_buffer_dtypes(self.module, buffers)
        if cfg.engine.precision != "fp32":
            cast_attention_masks(self.module, compute_dtype(cfg.engine.precision))
        self._unclipped_norm: float | None = None
        report_loss_scale_floor_in_trainer(self.engine.optimizer)
        self._written: list[str] = []
        self._watch_checkpoint_files(self.engine.checkpoint_engine)

    def _watch_checkpoint_files(self, checkpoint_engine) -> None:
        """Record the files this rank's saves write (for their checksums), and name the file when a
        weights-only load refuses one. DeepSpeed reads and writes every checkpoint file through its
        checkpoint engine's ``save(state, path)`` and ``load(path, map_location)``."""
        save, load = checkpoint_engine.save, checkpoint_engine.load

        def save_and_record(state_dict, path, *args, **kwargs):
            self._written.append(str(path))
            return save(state_dict, path, *args, **kwargs)

        def load_naming_refused_files(path, *args, **kwargs):
            try:
                return load(path, *args, **kwargs)
            except pickle.UnpicklingError as e:
                raise refused_file_error(str(path), e) from None

        checkpoint_engine.save, checkpoint_engine.load = save_and_record, load_naming_refused_files

    # -- one step -----------------------------------------------------------------------------------
    def set_hyperparameters(self, lr: float, weight_decay: float, step: int = 0,
                            lr_of_scale: Callable[[float], float] | None = None) -> None:
        """The scheduled values for optimizer step ``step``: each group's lr is ``lr * lr_scale``, or
        ``lr_of_scale(lr_scale)`` when given. A group with ``freeze_steps: N`` is left untouched by
        the optimizer during steps 0 to N - 1; one with ``zero_lr_steps: N`` steps at lr 0 then (its
        Adam moments still follow its gradients, as DINOv2 freezes its prototypes)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_of_scale(group["lr_scale"]) if lr_of_scale else lr * group["lr_scale"]
            if step < group.get("zero_lr_steps", 0):
                group["lr"] = 0.0
            if group.get("apply_weight_decay", True):
                group["weight_decay"] = weight_decay
            group["frozen"] = step < group.get("freeze_steps", 0)

    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, skip: bool = False) -> None:
        """One micro-step; at the accumulation boundary the optimizer steps (or skips, on request)."""
        self._unclipped_norm = None
        clip = self.cfg.train.clip_grad
        if clip and self.cfg.train.clip_mode == "per_param" and not skip and \
                self.engine.is_gradient_accumulation_boundary():
            self._unclipped_norm = self.clip_each_parameter(clip)
        self.optimizer.skip = skip
        try:
            self.engine.step()
        finally:
            self.optimizer.skip = False

    def fp16_overflow(self) -> tuple[float, float] | tuple[None, None] | None:
        """After an optimizer step: (loss scale, its minimum) when DeepSpeed skipped the step for a
        gradient overflow (and lowered the fp16 scale, down to the minimum); None otherwise. Its ZeRO
        optimizers skip steps whose gradients are not finite in fp32 and bf16 too ("OVERFLOW!
        Skipping step"), with no scale to lower: (None, None)."""
        if self.engine.was_step_applied():
            return None
        return loss_scale_state(self.engine.optimizer) or (None, None)

    def grad_norm(self) -> float | None:
        """Global gradient norm of the last optimizer step, before clipping, where DeepSpeed tracks it
        (or where per-parameter clipping measured it)."""
        if self._unclipped_norm is not None:
            return self._unclipped_norm
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def local_grad_norm(self) -> float:
        """Norm of the gradients held right now (for ZeRO-0 without mixed precision, where DeepSpeed
        keeps no norm); call before the boundary ``step``."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    @property
    def tracks_grad_norm(self) -> bool:
        return self.cfg.engine.zero_stage > 0 or self.cfg.engine.precision != "fp32" or \
            (self.cfg.train.clip_mode == "per_param" and bool(self.cfg.train.clip_grad))

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    # -- per-parameter clipping (DINO's utils.clip_gradients) ------------------------------------------
    def clip_each_parameter(self, clip: float) -> float:
        """Scale each parameter's gradient by ``clip / (norm + 1e-6)`` where that is below 1, ``norm``
        being the norm of the parameter's whole (unscaled) gradient, as DINO's ``clip_gradients`` does;
        returns the global norm before clipping. A collective: call on every rank after the last
        backward of an optimizer step, before ``engine.step()``.

        The reduced gradients are read where DeepSpeed keeps them until its step (see
        ``_local_grads``). Where a parameter's gradient is split over ranks, each rank's pieces'
        squares are summed by one all-reduce of a vector with an entry per parameter. fp16's loss
        scale is divided out of the norms, so the threshold applies to the true gradient."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        grads, replicated = self._local_grads(params)
        device = self.dist.device
        squares = torch.stack([g.float().pow(2).sum() if g is not None and g.numel() else
                               torch.zeros((), device=device) for g in grads]).to(device, torch.float64)
        if not replicated:
            self.dist.all_reduce(squares)
        norms = squares.sqrt() / self._loss_scale()
        coefs = (clip / (norms + 1e-6)).tolist()
        for p, grad, coef in zip(params, grads, coefs):
            if coef < 1 and grad is not None:
                grad.mul_(coef)
                if hasattr(p, "ds_id"):  # ZeRO-3 hands out an fp32 copy of a lower-precision partition
                    import_deepspeed().utils.safe_set_local_grad(p, grad)
        return float(norms.pow(2).sum().sqrt())

    def _local_grads(self, params: list[nn.Parameter]) -> tuple[list[torch.Tensor | None], bool]:
        """The reduced gradient of each parameter held on this rank, as tensors that DeepSpeed's step
        reads (scaling them in place scales what the optimizer gets), and whether every rank holds
        all of them rather than disjoint pieces.

        ZeRO-3: the rank's partition of each gradient. ZeRO-1/2, and DeepSpeed's BF16_Optimizer
        (bf16 without ZeRO in some DeepSpeed versions): the fragment of each gradient that belongs
        to the rank's part of the flat fp32 master weights (its ``_hp_mapping``; None when another
        rank owns all of it). Otherwise (no ZeRO: a torch optimizer, or DeepSpeed's fp16/bf16
        optimizers that copy ``param.grad`` at their step): ``param.grad``, whole on every rank."""
        safe_get_local_grad = import_deepspeed().utils.safe_get_local_grad
        grads, replicated = [], True
        for p in params:
            if hasattr(p, "ds_id"):
                replicated = False
                grads.append(safe_get_local_grad(p).view(-1))
            elif hasattr(p, "_hp_mapping"):
                replicated = False
                mapping = p._hp_mapping
                if mapping is None:
                    grads.append(None)
                    continue
                fragment = mapping.get_lp_grad_fragment(p._index_in_param_group).view(-1)
                address = mapping.lp_fragment_address
                if fragment.numel() != address.numel:  # BF16_Optimizer keeps whole gradients on every rank
                    fragment = fragment.narrow(0, address.start, address.numel)
                grads.append(fragment)
            else:
                grads.append(None if p.grad is None else p.grad.view(-1))
        return grads, replicated

    def _loss_scale(self) -> float:
        """The factor the gradients held before the step are multiplied by (fp16's loss scale, else 1)."""
        state = loss_scale_state(self.engine.optimizer)
        if state is not None:
            return state[0]
        wrapper = self.engine.optimizer  # a static fp16 scale: ZeRO's loss_scale, FP16_Optimizer's config
        for scale in (getattr(wrapper, "loss_scale", None),
                      getattr(getattr(wrapper, "loss_scale_config", None), "cur_scale", None)):
            if isinstance(scale, (int, float)) and scale > 0:
                return float(scale)
        return 1.0

    # -- checkpoints --------------------------------------------------------------------------------
    def weights_finite(self) -> bool:
        """Whether every rank's share of the weights is finite (a collective)."""
        bad = torch.zeros((), device=self.dist.device)
        for p in self.module.parameters():
            local = p.ds_tensor if hasattr(p, "ds_tensor") else p  # ZeRO-3 holds a partition
            if not torch.isfinite(local).all():
                bad.fill_(1.0)
                break
        return self.dist.all_reduce(bad, "max").item() == 0

    def save(self, directory: str, tag: str, client_state: dict) -> list[str]:
        """Write this rank's share of checkpoint ``tag``; the paths of the files it wrote."""
        self._written = []
        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)
        return list(self._written)

    def load(self, directory: str, tag: str, saved_world_size: int | None = None) -> dict:
        """Load checkpoint ``tag`` weights-only (CheckpointError naming a file that would run code);
        written by ``saved_world_size`` processes (None: by as many as now).

        With ZeRO at another world size, DeepSpeed's universal checkpoint re-shards the weights and
        the optimizer (see :func:`load_resharded`); its conversion reads weights-only too."""
        # A checkpoint's param groups carry the settings of the run that wrote them (torch's
        # load_state_dict copies them over ours; DeepSpeed's universal load copies the first group's
        # into every group); ours (lr scale, weight decay on or off, how and how long a group is
        # frozen) come from the config, so that a checkpoint written before a setting existed (a
        # DINOv2 freeze by skipping, now by lr 0) resumes with the config's.
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        try:
            with weights_only_loading():
                if saved_world_size not in (None, self.dist.world_size) and self.cfg.engine.zero_stage > 0:
                    client_state = load_resharded(self, Path(directory) / tag)
                else:
                    path, client_state = self.engine.load_checkpoint(directory, tag=tag,
                                                                     load_lr_scheduler_states=False)
                    if path is None:
                        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {os.path.join(directory, tag)}")
        except pickle.UnpicklingError as e:  # a torch.load outside the checkpoint engine
            raise refused_file_error(os.path.join(directory, tag), e) from None
        for group, own in zip(self.optimizer.param_groups, settings):
            params = group["params"]
            group.clear()
            group.update(own, params=params)
        return client_state

    def master_slices(self, params: list[nn.Parameter]) -> list[MasterSlice]:
        """Where each trainable parameter's fp32 master weights live on this rank; no communication.

        ZeRO-3: the rank's partition; ZeRO-1/2 and bf16 without ZeRO: the rank's fragment of the
        optimizer's flat fp32 buffer; fp32 without ZeRO: the parameter itself. Views stay valid
        until the next ``load``.
        """
        rank = self.dist.rank
        flat_masters = self._flat_fp32_masters()
        safe_get_local_fp32_param = import_deepspeed().utils.safe_get_local_fp32_param
        out = []
        masters_on_disk = self.cfg.engine.offload_path is not None
        for p in params:
            if hasattr(p, "ds_id"):
                values = local_shard(p) if masters_on_disk else safe_get_local_fp32_param(p).view(-1)
                out.append(MasterSlice(values, rank * p.ds_tensor.ds_numel, True))
            elif hasattr(p, "_hp_mapping"):
                mapping = p._hp_mapping
                if mapping is None:
                    out.append(MasterSlice(None, 0, False))
                else:
                    out.append(MasterSlice(mapping.get_hp_fragment().view(-1), mapping.lp_fragment_address.start,
                                           False))
            elif id(p) in flat_masters:
                out.append(MasterSlice(flat_masters[id(p)], 0, False))
            elif p.dtype == torch.float32:
                out.append(MasterSlice(p.data.view(-1), 0, False))
            else:
                raise RuntimeError(f"engine.precision={self.cfg.engine.precision} with engine.zero_stage="
                                   f"{self.cfg.engine.zero_stage} keeps no fp32 master weights that a momentum "
                                   f"teacher can follow; use bf16 or a ZeRO stage >= 1")
        return out

    def _flat_fp32_masters(self) -> dict[int, torch.Tensor]:
        """Mixed precision without ZeRO keeps whole fp32 copies of the parameters (DeepSpeed's
        FP16_Optimizer, flat per group, or FP16_UnfusedOptimizer, one per parameter; also for bf16)."""
        wrapper = self.engine.optimizer
        views = {}
        low = getattr(wrapper, "fp16_groups", ())
        if hasattr(wrapper, "fp32_groups_flat"):
            for group, flat in zip(low, wrapper.fp32_groups_flat):
                offset = 0
                for p in group:
                    views[id(p)] = flat.data[offset:offset + p.numel()]
                    offset += p.numel()
        elif hasattr(wrapper, "fp32_groups"):
            for group, masters in zip(low, wrapper.fp32_groups):
                views.update({id(p): m.data.view(-1) for p, m in zip(group, masters)})
        return views

    def full_fp32_state_dict(self, module: nn.Module, main_only: bool = False) -> dict[str, torch.Tensor]:
        """``module``'s state dict with every parameter from the fp32 master weights, on the CPU.

        A collective under ZeRO-3 (every rank must call it), one parameter at a time; every rank
        gets the full result, or with ``main_only`` only the main rank (the others an empty dict:
        they never hold the whole module).
        """
        params = {}
        keep = self.dist.is_main or not main_only
        flat_masters = self._flat_fp32_masters()  # mixed precision without ZeRO
        safe_get_full_fp32_param = import_deepspeed().utils.safe_get_full_fp32_param
        for name, p in module.named_parameters():
            full = safe_get_full_fp32_param(p)
            if not keep:
                continue
            if full is None and id(p) in flat_masters:
                full = flat_masters[id(p)].view_as(p)
            params[name] = (full if full is not None else p.detach()).float().cpu().clone()
        if not keep:
            return {}
        state = {}
        for name, value in module.state_dict().items():
            state[name] = params[name] if name in params else value.detach().cpu().clone()
        return state


# -- resuming at another world size ---------------------------------------------------------------------
UNIVERSAL_DIR = "universal"  # inside a checkpoint: its DeepSpeed universal conversion
BUFFERS_FILE = "buffers.pt"  # inside the conversion: the module's buffers, whole
UNIVERSAL_CHECKSUMS = "checksums.json"  # inside the conversion: each file's size and sha256


def load_resharded(engine: Engine, checkpoint: Path) -> dict:
    """Load a ZeRO checkpoint written by another number of processes; returns its client state
    (the param groups' settings are the caller's to restore: :meth:`Engine.load`).

    Weights and optimizer state go through DeepSpeed's universal checkpoint (``ds_to_universal``,
    then ``load_checkpoint`` with ``checkpoint.load_universal``), converted once into
    ``CHECKPOINT/universal``. That path loads no module buffers, so the buffers (a momentum
    teacher's master, DINO's centre, MoBY's queues) come from ``buffers.pt``, written whole by the
    conversion (:func:`merged_buffers`) and loaded by the module, which takes its own share.
    """
    universal = convert_to_universal(checkpoint, engine.module, engine.dist)
    ds = engine.engine
    # The documented switch is the config's ``checkpoint: {load_universal: true}``, read at load time;
    # set only for this load, since the engine is built before the run knows which checkpoint it resumes.
    ds._config.load_universal_checkpoint = True
    try:
        path, client_state = ds.load_checkpoint(str(universal.parent), tag=universal.name,
                                                load_lr_scheduler_states=False)
    finally:
        ds._config.load_universal_checkpoint = False
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the universal checkpoint {universal}")
    if hasattr(ds.optimizer, "fp32_partitioned_groups_flat"):
        restore_zero3_step_counts(ds.optimizer, universal)
    buffers = torch.load(universal / BUFFERS_FILE, map_location=engine.dist.device, weights_only=True)
    result = engine.module.load_state_dict(buffers, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"{universal / BUFFERS_FILE}: buffers this model does not have: "
                           f"{result.unexpected_keys[:5]}")
    return client_state


def restore_zero3_step_counts(zero3, universal: Path) -> None:
    """Each ZeRO-3 sub-group's own Adam step count, as saved. DeepSpeed's universal load gives every
    sub-group the first one's count, as one shared tensor that each sub-group's step then advances
    again: a frozen group (DINO's last layer, 0 steps) would come back as old as the others, and
    Adam's bias correction would be off. The conversion's ``optimizer_state.pt`` is rank 0's state,
    which holds every sub-group's count (in the order ZeRO-3's state dict lists them: by group)."""
    saved = torch.load(universal / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=True, mmap=True)
    states = saved["optimizer_state_dict"]["state"]
    groups = zero3.sub_group_to_group_id
    listed = sorted(range(len(zero3.fp32_partitioned_groups_flat)), key=lambda sub_group: groups[sub_group])
    base = zero3.optimizer
    for index, sub_group in enumerate(listed):
        flat = zero3.fp32_partitioned_groups_flat[sub_group]
        step = states.get(index, {}).get("step")
        if step is not None and flat in base.state:
            base.state[flat]["step"] = step.clone() if torch.is_tensor(step) else step


def convert_to_universal(checkpoint: Path, module: nn.Module, dist: DistEnv) -> Path:
    """``CHECKPOINT/universal``, converted by rank 0 if it is not there yet (a collective).

    Written under a temporary name and renamed when complete, so an interrupted conversion is
    redone, never half-read. Every file of it is recorded (size, sha256) in ``checksums.json``;
    a conversion whose files differ from their record (or that has none) is converted again from
    the checkpoint, which was verified before: the conversion is derived data."""
    target = checkpoint / UNIVERSAL_DIR
    if target.is_dir():
        problem = universal_problem(target, dist)
        if problem and dist.is_main:
            log.warning("%s; converting %s again", problem, checkpoint)
            shutil.rmtree(target)
        dist.barrier()
    failure = None
    if dist.is_main and not target.is_dir():
        from deepspeed.checkpoint import ds_to_universal

        scratch = checkpoint / f".{UNIVERSAL_DIR}.tmp{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        out = scratch / UNIVERSAL_DIR
        args = Namespace(input_folder=str(checkpoint), output_folder=str(out), num_extract_workers=1,
                         num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        log.info("converting %s for another number of processes (DeepSpeed universal checkpoint)", checkpoint)
        try:
            chatter = io.StringIO()  # its progress bars and prints
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), naming_refused_files():
                ds_to_universal.main(args)
                torch.save(merged_buffers(checkpoint, module), out / BUFFERS_FILE)
            files = {str(f.relative_to(out)): file_checksum(f) for f in sorted(out.rglob("*")) if f.is_file()}
            atomic_write(out / UNIVERSAL_CHECKSUMS, json.dumps({"files": files}, indent=1).encode())
            os.replace(out, target)
        except CheckpointError as e:
            failure = e
        except KeyError as e:
            # A group's state without its moments, or (an index) with no state at all.
            missing = e.args[0] if e.args else None
            if missing not in ("exp_avg", "exp_avg_sq") and not isinstance(missing, int):
                raise
            failure = unconvertible_error(checkpoint, e, dist.world_size)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    # Every rank learns whether rank 0 converted it (a barrier that cannot leave the others waiting).
    failed = dist.all_reduce(torch.tensor(float(failure is not None), device=dist.device), "max").item()
    if failure is not None:
        raise failure
    if failed:
        raise CheckpointError(f"{checkpoint}: rank 0 refused it while converting it for another number of "
                              f"processes (its error names the file)")
    return target


def unconvertible_error(checkpoint: Path, error: KeyError, world_size: int) -> CheckpointError:
    """The error for a checkpoint whose optimizer state lacks the Adam moments of a param group that
    had not stepped when it was saved (DINO's frozen last layer): written before SkipAndFreeze gave
    such groups their first state. DeepSpeed's conversion raises a bare ``KeyError: 'exp_avg'``."""
    try:
        saved = json.loads((checkpoint / META_NAME).read_text()).get("world_size")
    except (OSError, ValueError):
        saved = None
    original = f"its original {saved} processes" if saved else "the number of processes that wrote it"
    return CheckpointError(f"{checkpoint}: cannot be converted for {world_size} processes: its optimizer state has "
                           f"no Adam moments (KeyError: {error}) for a param group that had not stepped yet (a checkpoint "
                           f"written before vitscale saved them). Resume it once on {original} (its next "
                           f"checkpoint converts), then on {world_size}")


def universal_problem(universal: Path, dist: DistEnv) -> str | None:
    """Why the conversion ``universal`` is not as it was written, or None (a collective: the ranks
    share the hashing)."""
    try:
        recorded = json.loads((universal / UNIVERSAL_CHECKSUMS).read_text())
    except (OSError, ValueError) as e:
        return f"{universal / UNIVERSAL_CHECKSUMS}: no record of the conversion's files ({e})"
    return verify_files(universal, recorded, dist, UNIVERSAL_CHECKSUMS, "conversion")


@contextmanager
def naming_refused_files():
    """Inside, a file that weights-only loading refuses raises the CheckpointError naming it, also
    where DeepSpeed calls ``torch.load`` itself rather than through its checkpoint engine (the
    universal conversion)."""
    load = torch.load

    def load_naming_refused_file(f, *args, **kwargs):
        try:
            return load(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise refused_file_error(str(f), e) from None

    torch.load = load_naming_refused_file
    try:
        yield
    finally:
        torch.load = load


def _rank_of(path: Path) -> int:
    found = re.search(r"zero_pp_rank_(\d+)_", path.name)
    return int(found.group(1)) if found else 0


def merged_buffers(checkpoint: Path, module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s buffers as saved in ``checkpoint``, whole: rank 0's copy, except buffers that
    each rank saved its own part of (a ZeRO-3 momentum teacher's master), which the module that owns
    them merges (``merge_partitions(name, parts)``, parts in rank order)."""
    files = sorted(checkpoint.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"), key=_rank_of) or \
        [checkpoint / "mp_rank_00_model_states.pt"]
    owners = {f"{prefix}.{name}" if prefix else name: (m, name)
              for prefix, m in module.named_modules() for name in getattr(m, "partitioned_buffers", ())}
    names = {name for name, _ in module.named_buffers()}
    merged, parts = {}, {key: [] for key in owners}
    for index, file in enumerate(files):
        saved = torch.load(file, map_location="cpu", weights_only=True)["module"]
        if index == 0:
            merged = {k: v for k, v in saved.items() if k in names}
        for key in owners:
            if key in saved:
                parts[key].append(saved[key])
        del saved
    for key, (owner, name) in owners.items():
        if parts[key]:
            merged[key] = owner.merge_partitions(name, parts[key])
    return merged
