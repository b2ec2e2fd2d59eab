"""The optimizer and its param groups: AdamW whose step can be skipped, frozen groups left alone,
and the scheduled lr and weight decay set on each group."""

from __future__ import annotations

from typing import Callable

import torch

from pretrain.dist import DistEnv
from pretrain.engine.imports import import_deepspeed
from pretrain.sections import Config


class SkipAndFreeze:
    """An optimizer mixin that leaves weights and moments untouched while ``skip`` is set, and
    always leaves alone the param groups marked ``frozen``.

    DeepSpeed's ZeRO wrappers call the inner optimizer once per parameter sub-group, so the flag
    is held for the whole of one ``engine.step()`` rather than consumed by the first call. A frozen
    group is treated as torch treats parameters without a gradient: no update, no weight decay,
    moments and step count untouched. (ZeRO hands its flat partitions a zero gradient instead of
    none, which would still decay the weights and age the step count.)
    """

    # A bool, or a 0-d device tensor (1.0: skip), held for one ``engine.step()``.
    skip: bool | torch.Tensor = False
    # Set by the engine where the gradients' finiteness is known on the device (their global norm):
    # a 0-d tensor, 1.0 when they are not finite; such a step is skipped too.
    nonfinite_gradients: Callable[[], torch.Tensor] | None = None
    # Whether the optimizer takes a device flag (torch's fused AdamW: ``found_inf``); else it is read
    # on the host.
    skips_on_device = False

    def step(self, closure=None):
        skip = self.skip
        if self.nonfinite_gradients is not None:
            flag = self.nonfinite_gradients()
            skip = flag if skip is False else torch.maximum(torch.as_tensor(skip, dtype=flag.dtype,
                                                                            device=flag.device), flag)
        if torch.is_tensor(skip) and not self.skips_on_device:
            skip = bool(skip)
        if skip is True:
            return None
        groups = self.param_groups
        if torch.is_tensor(skip):
            # Weights, moments and step counts stay as they were where it is 1.0 (its dtype must be fp32).
            self.found_inf = skip.float()
        try:
            if not any(g.get("frozen") for g in groups):
                return super().step(closure)
            self.param_groups = [g for g in groups if not g.get("frozen")]
            return super().step(closure)
        finally:
            self.param_groups = groups
            self.found_inf = None

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
    """torch's fused AdamW (on GPUs and CPUs alike: one kernel for all tensors, and a step it skips
    on the device), with :class:`SkipAndFreeze`."""

    skips_on_device = True

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
                              fused=True)
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



def apply_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float, step: int = 0,
                          lr_of_scale: Callable[[float], float] | None = None) -> None:
    """The scheduled values for optimizer step ``step``: each group's lr is ``lr * lr_scale``, or
    ``lr_of_scale(lr_scale)`` when given. A group with ``freeze_steps: N`` is left untouched by the
    optimizer during steps 0 to N - 1; one with ``zero_lr_steps: N`` steps at lr 0 then (its Adam
    moments still follow its gradients, as DINOv2 freezes its prototypes)."""
    for group in optimizer.param_groups:
        group["lr"] = lr_of_scale(group["lr_scale"]) if lr_of_scale else lr * group["lr_scale"]
        if step < group.get("zero_lr_steps", 0):
            group["lr"] = 0.0
        if group.get("apply_weight_decay", True):
            group["weight_decay"] = weight_decay
        group["frozen"] = step < group.get("freeze_steps", 0)
