"""The Objective interface: everything that differs between supervised, MoBY and DINO training.

An objective owns its backbone, heads, loss, views and any extra state (teacher, queues, centre);
the trainer only calls the methods below, so a new objective is one new file and one config.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from pretrain.dist import DistEnv
from pretrain.engine import compute_dtype, partitioned_shape
from pretrain.sections import Config


@dataclass(frozen=True)
class RunContext:
    """What an objective may need to know about the run it is part of."""

    num_classes: int
    total_steps: int
    steps_per_epoch: int
    dist: DistEnv
    precision: str = "fp32"  # engine.precision
    autocast: bool = False  # engine.autocast, resolved: bf16 by torch.autocast on fp32 weights

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the weights, which objectives cast their inputs to (fp32 under autocast,
        which casts to bf16 inside the ops that compute in it)."""
        return torch.float32 if self.autocast else compute_dtype(self.precision)


class Objective(nn.Module):
    def __init__(self, cfg: Config, ctx: RunContext) -> None:
        super().__init__()
        self.cfg, self.ctx = cfg, ctx

    # -- data ---------------------------------------------------------------------------------------
    def train_view(self) -> Callable:
        """Picklable ``PIL.Image -> dict of uint8 tensors`` run in the data workers."""
        raise NotImplementedError

    def eval_view(self) -> Callable | None:
        """The view for validation batches, or None when the objective does not validate."""
        return None

    # -- training -----------------------------------------------------------------------------------
    # The methods engine.compile compiles (pretrain.engine.compilation): functions of tensors, and of
    # Python values that seldom change, so that one graph serves every step.
    compiled_steps: tuple[str, ...] = ("micro_step",)

    def forward(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, metrics) of one micro-batch; metrics are detached scalar tensors."""
        return self.micro_step(batch, **self.step_inputs(batch, step))

    def step_inputs(self, batch: dict, step: int) -> dict:
        """What :meth:`micro_step` needs of step ``step`` beyond the batch, made on the host: numbers
        that change every step as 0-d tensors (:meth:`step_scalar`), flags that seldom change as
        Python values (each value is a graph of its own), draws that only the host makes."""
        return {}

    def micro_step(self, batch: dict, **inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, metrics) of one micro-batch: the views made on the device, the forwards, heads and
        loss, and the state every micro-batch moves (centres, queues). Without host syncs: compiled,
        it is one graph."""
        raise NotImplementedError

    def step_scalar(self, value: float) -> torch.Tensor:
        """``value`` as a 0-d float32 tensor on the device: an input of the compiled step, where a
        Python float would be a constant of it (a new graph each step). ``torch.full`` fills on
        the device; ``torch.tensor(value, device=...)`` copies from the host, which waits for the
        device's queue to drain."""
        return torch.full((), value, dtype=torch.float32, device=self.ctx.dist.device)

    def after_step(self, step: int, engine) -> None:
        """Called after every optimizer step, applied or skipped (``engine.applied()``, a device flag,
        tells which): momentum teachers update here."""

    def val_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Sums over the batch, including ``count``; the trainer reports ``sum / count`` per key."""
        raise NotImplementedError

    # -- parameters ---------------------------------------------------------------------------------
    def backbone(self) -> nn.Module:
        """The timm model that is exported."""
        raise NotImplementedError

    def backbone_state_dict(self, engine, main_only: bool = False) -> dict[str, torch.Tensor]:
        """The exported backbone's full fp32 weights on the CPU (a collective under ZeRO-3; with
        ``main_only``, only the main rank gets them). Objectives whose backbone is not trained by
        the optimizer (a momentum teacher) override this."""
        return engine.full_fp32_state_dict(self.backbone(), main_only)

    def backbone_prefix(self) -> str:
        """The backbone's name inside this module's state dict (``backbone.`` for ``self.backbone``)."""
        for name, module in self.named_modules():
            if module is self.backbone():
                return name + "."
        raise ValueError("backbone() is not a submodule of the objective")

    def param_groups(self) -> list[dict]:
        """Trainable parameters split into decayed and not decayed, by the rules of ``optim.no_decay``."""
        no_decay = self.no_decay_names()
        decay, plain = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (plain if name in no_decay else decay).append(param)
        groups = [{"params": decay, "apply_weight_decay": True},
                  {"params": plain, "apply_weight_decay": False, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def no_decay_names(self) -> set[str]:
        """Names of the parameters that ``optim.no_decay`` exempts from weight decay."""
        rules = self.cfg.optim.no_decay
        listed = set()
        if "timm" in rules:
            for module_name, module in self.named_modules():
                if hasattr(module, "no_weight_decay"):
                    prefix = module_name + "." if module_name else ""
                    listed |= {prefix + n for n in module.no_weight_decay()}
        patterns = [r for r in rules if r not in ("1d", "timm")]
        out = set()
        for name, param in self.named_parameters():
            ndim = len(partitioned_shape(param))
            if ("1d" in rules and ndim <= 1) or name in listed or \
                    any(name.startswith(s + ".") for s in listed) or \
                    any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
                out.add(name)
        return out
