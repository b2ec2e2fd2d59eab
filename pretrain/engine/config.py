"""The DeepSpeed config a run's own keys give, and the checks that keep ``engine.deepspeed`` and the
offload settings from contradicting them or failing late."""

from __future__ import annotations

import dataclasses

from pretrain.engine.imports import import_deepspeed
from pretrain.sections import Config, ConfigError, merge


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


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    micro, accum = cfg.data.batch_size, cfg.train.grad_accum
    generated = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        # Per-parameter clipping is the engine's own (Engine.clip_each_parameter); DeepSpeed clips the global norm.
        "gradient_clipping": (cfg.train.clip_grad or 0.0) if cfg.train.clip_mode == "global" else 0.0,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        # Under autocast the weights are fp32 and DeepSpeed's bf16 is off. Its non-finite-gradient
        # check is a host sync; the engine skips such steps on the device (pretrain.engine.device_skip).
        "bf16": {"enabled": cfg.engine.precision == "bf16" and cfg.engine.autocast is not True,
                 "check_grad_overflow": False},
        # DeepSpeed enters torch.autocast in its forward only when told (it turns an outer one off). No
        # lower-precision modules: gradients are reduced in fp32, as DDP reduces them under autocast.
        "torch_autocast": {"enabled": cfg.engine.autocast is True, "dtype": "bfloat16",
                           "lower_precision_safe_modules": []},
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
    "bf16.enabled": ("engine.precision and engine.autocast", "engine.precision or engine.autocast"),
    "torch_autocast.enabled": ("engine.autocast", "engine.autocast"),
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


