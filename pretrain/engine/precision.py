"""The engine's compute dtype, what the accelerator supports, and keeping DeepSpeed's casts from
touching what must stay in its own dtype (buffers, masks); fp16's loss scale as DeepSpeed keeps it."""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
import torch.nn as nn

from pretrain.engine.imports import import_deepspeed
from pretrain.sections import Config, ConfigError, EngineConfig


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


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the engine computes in for ``engine.precision`` (its fp32 masters aside)."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def weights_dtype(engine: EngineConfig) -> torch.dtype:
    """The dtype the module's weights (and the objectives' inputs) are held in: fp32 under autocast,
    else ``engine.precision``'s."""
    return torch.float32 if engine.autocast is True else compute_dtype(engine.precision)


def autocast_context(engine: EngineConfig, device: torch.device):
    """torch.autocast to bf16 on ``device`` where the run autocasts, else nothing."""
    if engine.autocast is True:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe_precision(engine: EngineConfig) -> str:
    """The precision mode a run trains in, for its log and run.json."""
    if engine.precision == "fp32":
        return "fp32"
    if engine.autocast is True:
        return "bf16 autocast on fp32 weights"
    return f"{engine.precision} weights and gradients with fp32 masters (DeepSpeed's {engine.precision})"


def autocasts(precision: str, autocast: bool | str, zero_stage: int | str) -> bool:
    """Whether a run that starts afresh autocasts: only bf16 does, and ``auto`` at every stage but
    ZeRO-3 (:func:`resolve_autocast` says why)."""
    if precision != "bf16":
        return False
    return zero_stage != 3 if autocast == "auto" else bool(autocast)


def resolve_autocast(cfg: Config, saved: dict | None) -> Config:
    """``cfg`` with ``engine.autocast`` a bool. ``saved``: the meta data of the checkpoint the run
    resumes, if any; its mode is kept, since the optimizer state of one does not load into the
    other (checkpoints that record none were written in DeepSpeed's bf16, the only mode then).
    ``auto`` is autocast at ZeRO 0-2, where DeepSpeed's bf16 saves nothing or little and costs a
    cast and an overflow check per step, and DeepSpeed's at ZeRO-3, where halving the gathered
    weights and the reduced gradients is the point of the stage."""
    e = cfg.engine
    if e.precision == "bf16" and saved is not None and saved.get("precision") == e.precision:
        written = bool(saved.get("autocast", False))
        if e.autocast not in ("auto", written):
            raise ConfigError(f"engine.autocast={e.autocast}: the checkpoint this run resumes was written with "
                              f"engine.autocast={written} ({'fp32' if written else 'bf16'} weights), whose optimizer "
                              f"state the other mode cannot load; set engine.autocast={written} or auto, or "
                              f"train.resume=false")
        autocast = written
    else:
        # (engine.zero_stage=auto is resolved before this in a run; a check before it takes it as below 3)
        autocast = autocasts(e.precision, e.autocast, e.zero_stage)
    return dataclasses.replace(cfg, engine=dataclasses.replace(e, autocast=autocast))


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


