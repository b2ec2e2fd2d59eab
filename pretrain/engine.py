"""The DeepSpeed engine: the only module that imports deepspeed.

It translates the run config into a DeepSpeed config, wraps the objective with a torch AdamW whose
step can be skipped (for non-finite losses), sets the scheduled lr and weight decay on the
optimizer's groups, and saves, loads and gathers the fp32 master weights.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import deepspeed
import torch
import torch.nn as nn
from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param

from pretrain.config import Config, ConfigError, merge
from pretrain.dist import DistEnv

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MasterSlice:
    """The part of one parameter's fp32 master weights that this rank holds.

    ``values`` is a 1-D fp32 view of the optimizer's own storage (None when other ranks hold all
    of it), covering elements ``start:start + len(values)`` of the flattened parameter.
    ``partitioned`` (ZeRO-3): the parameter's compute copy is partitioned the same way, so
    ``local_shard`` of a same-shaped parameter lines up with ``values`` element for element.
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


class SkippableAdamW(torch.optim.AdamW):
    """AdamW that leaves weights and moments untouched while ``skip`` is set, and always leaves
    alone the param groups marked ``frozen``.

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


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    micro, accum = cfg.data.batch_size, cfg.train.grad_accum
    generated = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": cfg.train.clip_grad or 0.0,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "bf16": {"enabled": cfg.engine.precision == "bf16"},
        "fp16": {"enabled": cfg.engine.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,  # a torch AdamW: fused on GPUs, portable on CPU
        "steps_per_print": 2**62,  # the trainer does the logging
        "wall_clock_breakdown": False,
    }
    return merge(generated, cfg.engine.deepspeed)


BATCH_KEYS = {"train_batch_size": "the global batch: data.batch_size x train.grad_accum x processes",
              "train_micro_batch_size_per_gpu": "data.batch_size",
              "gradient_accumulation_steps": "train.grad_accum"}


def check_deepspeed_batch(cfg: Config, world_size: int) -> None:
    """ConfigError when ``engine.deepspeed`` sets a batch size that contradicts the run's own: the
    data stream, the schedules and the checkpoints follow the config's arithmetic, not DeepSpeed's."""
    generated = deepspeed_config(cfg, world_size)
    micro, accum = cfg.data.batch_size, cfg.train.grad_accum
    ours = {"train_batch_size": micro * accum * world_size, "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accum}
    for key, meaning in BATCH_KEYS.items():
        if key in cfg.engine.deepspeed and generated[key] != ours[key]:
            raise ConfigError(f"engine.deepspeed.{key}={cfg.engine.deepspeed[key]!r}: this run's is {ours[key]} "
                              f"({meaning}, on {world_size} processes); set data.batch_size, data.global_batch "
                              f"or train.grad_accum instead")


def check_precision(precision: str) -> None:
    """ConfigError unless this machine's accelerator can train in ``precision``."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = {"fp32": True, "bf16": accelerator.is_bf16_supported(), "fp16": accelerator.is_fp16_supported()}
    if not supported[precision]:
        raise ConfigError(f"engine.precision={precision!r}: not supported on {accelerator.device_name()} "
                          f"(supported here: {', '.join(k for k, ok in supported.items() if ok)})")


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


class Engine:
    def __init__(self, module: nn.Module, param_groups: list[dict], cfg: Config, dist: DistEnv) -> None:
        self.cfg, self.dist = cfg, dist
        check_precision(cfg.engine.precision)
        if cfg.engine.compile:
            compile_backbone(module)
        o = cfg.optim
        fused = dist.device.type == "cuda"
        self.optimizer = SkippableAdamW(param_groups, lr=0.0, betas=o.betas, eps=o.eps,
                                        weight_decay=o.weight_decay, fused=fused or None)
        for group in self.optimizer.param_groups:
            group.setdefault("lr_scale", 1.0)
        self.ds_config = deepspeed_config(cfg, dist.world_size)
        self.engine, *_ = deepspeed.initialize(model=module, optimizer=self.optimizer, config=self.ds_config,
                                               dist_init_required=False)
        self.module = self.engine.module
        report_loss_scale_floor_in_trainer(self.engine.optimizer)

    # -- one step -----------------------------------------------------------------------------------
    def set_hyperparameters(self, lr: float, weight_decay: float, step: int = 0) -> None:
        """The scheduled values for optimizer step ``step``; a group with ``freeze_steps: N`` is left
        untouched by the optimizer during steps 0 to N - 1."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
            if group.get("apply_weight_decay", True):
                group["weight_decay"] = weight_decay
            group["frozen"] = step < group.get("freeze_steps", 0)

    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, skip: bool = False) -> None:
        """One micro-step; at the accumulation boundary the optimizer steps (or skips, on request)."""
        self.optimizer.skip = skip
        try:
            self.engine.step()
        finally:
            self.optimizer.skip = False

    def fp16_overflow(self) -> tuple[float, float] | None:
        """After an optimizer step: (loss scale, its minimum) when DeepSpeed skipped the step for an fp16
        gradient overflow (and lowered the scale, down to the minimum); None otherwise."""
        state = loss_scale_state(self.engine.optimizer)
        if state is None or self.engine.was_step_applied():
            return None
        return state

    def grad_norm(self) -> float | None:
        """Global gradient norm of the last optimizer step, before clipping, where DeepSpeed tracks it."""
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
        return self.cfg.engine.zero_stage > 0 or self.cfg.engine.precision != "fp32"

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

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

    def save(self, directory: str, tag: str, client_state: dict) -> None:
        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)

    def load(self, directory: str, tag: str) -> dict:
        path, client_state = self.engine.load_checkpoint(directory, tag=tag, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed could not load checkpoint {os.path.join(directory, tag)}")
        return client_state

    def master_slices(self, params: list[nn.Parameter]) -> list[MasterSlice]:
        """Where each trainable parameter's fp32 master weights live on this rank; no communication.

        ZeRO-3: the rank's partition; ZeRO-1/2 and bf16 without ZeRO: the rank's fragment of the
        optimizer's flat fp32 buffer; fp32 without ZeRO: the parameter itself. Views stay valid
        until the next ``load``.
        """
        rank = self.dist.rank
        flat_masters = self._flat_fp32_masters()
        out = []
        for p in params:
            if hasattr(p, "ds_id"):
                values = safe_get_local_fp32_param(p).view(-1)
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

    def full_fp32_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``module``'s state dict with every parameter from the fp32 master weights, on the CPU.

        A collective under ZeRO-3 (every rank must call it); every rank gets the full result.
        """
        params = {}
        flat_masters = self._flat_fp32_masters()  # mixed precision without ZeRO
        for name, p in module.named_parameters():
            full = safe_get_full_fp32_param(p)
            if full is None and id(p) in flat_masters:
                full = flat_masters[id(p)].view_as(p)
            params[name] = (full if full is not None else p.detach()).float().cpu().clone()
        state = {}
        for name, value in module.state_dict().items():
            state[name] = params[name] if name in params else value.detach().cpu().clone()
        return state
