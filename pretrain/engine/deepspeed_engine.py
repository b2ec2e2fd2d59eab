"""DeepSpeed's engine behind vitscale's engine interface (see the package's docstring).

It wraps the objective with a torch AdamW whose step can be skipped (non-finite losses) or leaves
frozen groups alone, sets the scheduled lr and weight decay on the optimizer's groups, and saves and
loads its own shards of a checkpoint; the checkpoint's directory, meta data and checksums are the
checkpointer's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from pretrain.dist import DistEnv
from pretrain.engine.checkpoint_io import ShardFiles, load_keeping_group_settings
from pretrain.engine.clipping import clip_each_parameter
from pretrain.engine.compilation import compile_steps
from pretrain.engine.config import check_offload, deepspeed_config
from pretrain.engine.device_skip import invalid_norm, leave_norm_checks_to_the_device
from pretrain.engine.imports import import_deepspeed
from pretrain.engine.masters import full_fp32_state_dict, master_slices, weights_finite
from pretrain.engine.optimizer import apply_hyperparameters, make_optimizer
from pretrain.engine.partitions import MasterSlice
from pretrain.engine.precision import (autocast_context, cast_attention_masks, check_accelerator, keep_buffer_dtypes,
                                       loss_scale_state, report_loss_scale_floor_in_trainer, resolve_autocast,
                                       weights_dtype)
from pretrain.engine.universal import load_universal
from pretrain.sections import Config


class Engine:
    def __init__(self, module: nn.Module, param_groups: list[dict], cfg: Config, dist: DistEnv) -> None:
        """``cfg.engine.autocast`` is resolved (a bool: :func:`~pretrain.engine.precision.resolve_autocast`)."""
        if cfg.engine.autocast == "auto":  # built outside a trainer, for a fresh run
            cfg = resolve_autocast(cfg, None)
        self.cfg, self.dist = cfg, dist
        e = cfg.engine
        check_accelerator(e.precision)
        check_offload(cfg)
        if e.compile:
            compile_steps(module, e.compile_backend)
        self.optimizer = make_optimizer(param_groups, cfg, dist)
        for group in self.optimizer.param_groups:
            group.setdefault("lr_scale", 1.0)
        self.ds_config = deepspeed_config(cfg, dist.world_size)
        # Without ZeRO on fp32 weights DeepSpeed steps the torch optimizer itself, and its clipping
        # reads the norm on the host: the engine measures (and clips by) the norm on the device instead.
        self.torch_optimizer_steps = e.zero_stage == 0 and weights_dtype(e) == torch.float32
        self.clip_global = cfg.train.clip_mode == "global" and bool(cfg.train.clip_grad)
        if self.torch_optimizer_steps:
            self.ds_config["gradient_clipping"] = 0.0
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
        if weights_dtype(e) != torch.float32:
            cast_attention_masks(self.module, weights_dtype(e))
        if e.zero_stage == 0 and dist.world_size == 1:
            self.engine.enable_backward_allreduce = False  # one process: nothing to average, and no copies for it
        self._skip: bool | torch.Tensor = False
        self._norm: torch.Tensor | None = None  # the last optimizer step's gradient norm, before clipping
        self._nonfinite_gradients: torch.Tensor | None = None
        if self.torch_optimizer_steps:
            self.optimizer.nonfinite_gradients = lambda: self._nonfinite_gradients
        elif e.zero_stage > 0 and e.precision != "fp16":
            # The ZeRO optimizers' global norm, all-reduced, is set before they step the inner optimizer.
            leave_norm_checks_to_the_device()
            self.optimizer.nonfinite_gradients = self._zero_nonfinite_gradients
        report_loss_scale_floor_in_trainer(self.engine.optimizer)
        self._files = ShardFiles(self.engine.checkpoint_engine)

    # -- one step -----------------------------------------------------------------------------------
    def set_hyperparameters(self, lr: float, weight_decay: float, step: int = 0,
                            lr_of_scale: Callable[[float], float] | None = None) -> None:
        """The scheduled values for optimizer step ``step`` (:func:`apply_hyperparameters`)."""
        apply_hyperparameters(self.optimizer, lr, weight_decay, step, lr_of_scale)

    def autocast(self):
        """The context the objective computes in outside :meth:`forward` (evaluation): torch.autocast
        where the run autocasts (DeepSpeed's forward enters it itself, ``torch_autocast``)."""
        return autocast_context(self.cfg.engine, self.dist.device)

    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, skip: bool | torch.Tensor = False, measure_grad_norm: bool = False) -> float | None:
        """One micro-step; at the accumulation boundary the optimizer steps, or leaves everything as
        it was where ``skip`` (a bool, or a 0-d device tensor: 1.0) or the gradients are not finite.
        Nothing here waits for the device, except: ``measure_grad_norm`` (at the boundary) returns
        the global gradient norm before clipping; fp16 and DeepSpeed's bf16 without ZeRO check
        overflows on the host (DeepSpeed's own wrappers)."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self._norm = self._nonfinite_gradients = None
        self._skip = skip
        if boundary:
            self._norm = self._clip_or_measure()
            if self._norm is not None:
                self._nonfinite_gradients = invalid_norm(self._norm)
        self.optimizer.skip = skip
        try:
            self.engine.step()
        finally:
            self.optimizer.skip = False
        return self.grad_norm() if measure_grad_norm and boundary else None

    def _clip_or_measure(self) -> torch.Tensor | None:
        """Before the boundary step: per-parameter clipping (every stage), or where the engine steps
        torch's optimizer itself, the global norm (clipped by it with ``train.clip_mode=global``)."""
        clip = self.cfg.train.clip_grad
        if clip and self.cfg.train.clip_mode == "per_param":
            return self.clip_each_parameter(clip)
        if not self.torch_optimizer_steps:
            return None  # DeepSpeed's wrapper measures (and clips) it
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros((), device=self.dist.device)
        if self.clip_global:
            torch.nn.utils.clip_grads_with_norm_(grads, clip, norm, foreach=True)
        return norm

    def clip_each_parameter(self, clip: float) -> torch.Tensor:
        """DINO's per-parameter clipping (:func:`clip_each_parameter`); the global norm before it."""
        return clip_each_parameter(self.module, self.engine.optimizer, self.dist, clip)

    def _zero_nonfinite_gradients(self) -> torch.Tensor:
        norm = getattr(self.engine.optimizer, "_global_grad_norm", None)
        if norm is None:
            return torch.zeros((), device=self.dist.device)
        if not torch.is_tensor(norm):  # a number: DeepSpeed's mark of a step it skipped itself
            norm = torch.full((), float(norm), device=self.dist.device)
        return invalid_norm(norm)

    @property
    def nonfinite_gradients(self) -> torch.Tensor | None:
        """After a boundary step: 1.0 (a device tensor) where it was skipped because its gradients were
        not finite, where the engine knows it on the device; None elsewhere (DeepSpeed's own checks:
        :meth:`fp16_overflow`)."""
        if self._nonfinite_gradients is not None:
            return self._nonfinite_gradients
        if self.optimizer.nonfinite_gradients is not None and not self.torch_optimizer_steps:
            return self.optimizer.nonfinite_gradients()
        return None

    def applied(self) -> torch.Tensor:
        """After a boundary step: 1.0 (a 0-d device tensor) where the optimizer stepped, 0.0 where it
        left everything as it was (asked to skip, non-finite gradients, a DeepSpeed overflow). The
        momentum teachers scale their update by it; nothing waits for the device."""
        if not self.engine.was_step_applied():
            return torch.zeros((), device=self.dist.device)
        skipped = self._skip.float() if torch.is_tensor(self._skip) else \
            torch.full((), float(self._skip), device=self.dist.device)
        grads = self.nonfinite_gradients
        if grads is not None:
            skipped = torch.maximum(skipped, grads)
        return 1.0 - skipped

    def fp16_overflow(self) -> tuple[float, float] | tuple[None, None] | None:
        """After an optimizer step: (loss scale, its minimum) when DeepSpeed skipped the step for a
        gradient overflow (and lowered the fp16 scale, down to the minimum); None otherwise. Where
        DeepSpeed checks non-finite gradients on the host without a scale to lower (DeepSpeed's
        bf16 without ZeRO): (None, None)."""
        if self.engine.was_step_applied():
            return None
        return loss_scale_state(self.engine.optimizer) or (None, None)

    def grad_norm(self) -> float | None:
        """Global gradient norm of the last optimizer step, before clipping (a host read)."""
        norm = self._norm if self._norm is not None else self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    # -- the fp32 master weights ----------------------------------------------------------------------
    def master_slices(self, params: list[nn.Parameter]) -> list[MasterSlice]:
        """Where each of ``params``' fp32 master weights live on this rank (:func:`master_slices`)."""
        e = self.cfg.engine
        refusal = (f"engine.precision={e.precision} with engine.zero_stage={e.zero_stage} keeps no fp32 master "
                   f"weights that a momentum teacher can follow; use bf16 or a ZeRO stage >= 1")
        return master_slices(self.engine.optimizer, params, self.dist.rank, e.offload_path is not None, refusal)

    def full_fp32_state_dict(self, module: nn.Module, main_only: bool = False) -> dict[str, torch.Tensor]:
        """``module``'s state dict from the fp32 masters, whole (:func:`full_fp32_state_dict`; a collective)."""
        return full_fp32_state_dict(self.engine.optimizer, module, self.dist, main_only)

    def weights_finite(self) -> bool:
        """Whether every rank's share of the weights is finite (a collective)."""
        return weights_finite(self.module, self.dist)

    # -- its shards of a checkpoint -------------------------------------------------------------------
    def save(self, directory: str, tag: str, client_state: dict) -> list[str]:
        """Write this rank's share of checkpoint ``tag``; the paths of the files it wrote."""
        return self._files.save(self.engine, directory, tag, client_state)

    def reshards(self, saved_world_size: int | None) -> bool:
        """Whether a checkpoint written by ``saved_world_size`` processes (None: by as many as now)
        loads only through its universal conversion (:meth:`load_universal`): ZeRO's partitions,
        written for another number of processes."""
        return saved_world_size not in (None, self.dist.world_size) and self.cfg.engine.zero_stage > 0

    def load(self, directory: str, tag: str) -> dict:
        """Load checkpoint ``tag``, written by as many processes (or without ZeRO), weights-only
        (CheckpointError naming a file that would run code). Returns its client state."""
        def load() -> dict:
            path, client_state = self.engine.load_checkpoint(directory, tag=tag, load_lr_scheduler_states=False)
            if path is None:
                raise FileNotFoundError(f"DeepSpeed could not load checkpoint {os.path.join(directory, tag)}")
            return client_state

        return load_keeping_group_settings(self.optimizer, load, os.path.join(directory, tag))

    def load_universal(self, universal: Path) -> dict:
        """Load a ZeRO checkpoint written by another number of processes from its universal
        conversion ``universal`` (:func:`write_universal`), weights-only. Returns its client state."""
        return load_keeping_group_settings(self.optimizer, lambda: load_universal(self, universal), str(universal))
