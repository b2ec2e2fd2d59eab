"""ZeRO-3's partitioned parameters: reading them, and building a model partitioned from the start.

Everything else in vitscale reads a parameter's shape, size or local storage through these helpers,
so it works the same on a whole parameter and on a ZeRO-3 partition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from pretrain.dist import DistEnv
from pretrain.engine.config import deepspeed_config
from pretrain.engine.imports import import_deepspeed
from pretrain.engine.precision import weights_dtype
from pretrain.sections import Config, merge


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
    dtype = weights_dtype(cfg.engine)
    if dtype != torch.float32:
        for param in module.parameters():
            if hasattr(param, "ds_tensor") and param.dtype != dtype:
                param.ds_tensor.data = param.ds_tensor.data.to(dtype)
                param.data = torch.empty(0, dtype=dtype, device=param.data.device)
        check_partition_dtypes(module, dtype, f"cast to the weights' dtype of engine.precision={cfg.engine.precision}")
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


