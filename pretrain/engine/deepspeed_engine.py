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
from pretrain.engine.imports import import_deepspeed
from pretrain.engine.masters import full_fp32_state_dict, master_slices, weights_finite
from pretrain.engine.optimizer import apply_hyperparameters, make_optimizer
from pretrain.engine.partitions import MasterSlice
from pretrain.engine.precision import (cast_attention_masks, check_accelerator, compute_dtype, keep_buffer_dtypes,
                                       loss_scale_state, report_loss_scale_floor_in_trainer)
from pretrain.engine.universal import load_universal
from pretrain.sections import Config


class Engine:
    def __init__(self, module: nn.Module, param_groups: list[dict], cfg: Config, dist: DistEnv) -> None:
        self.cfg, self.dist = cfg, dist
        check_accelerator(cfg.engine.precision)
        check_offload(cfg)
        if cfg.engine.compile:
            compile_steps(module, cfg.engine.compile_backend)
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
        self._files = ShardFiles(self.engine.checkpoint_engine)

    # -- one step -----------------------------------------------------------------------------------
    def set_hyperparameters(self, lr: float, weight_decay: float, step: int = 0,
                            lr_of_scale: Callable[[float], float] | None = None) -> None:
        """The scheduled values for optimizer step ``step`` (:func:`apply_hyperparameters`)."""
        apply_hyperparameters(self.optimizer, lr, weight_decay, step, lr_of_scale)

    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, skip: bool = False, measure_grad_norm: bool = False) -> float | None:
        """One micro-step; at the accumulation boundary the optimizer steps (or skips, on request).
        With ``measure_grad_norm`` (at the boundary), the global gradient norm before clipping, from
        where this engine has it: measured before the step where DeepSpeed keeps none (ZeRO-0 in
        fp32), else DeepSpeed's (or per-parameter clipping's) after it."""
        measured_here = measure_grad_norm and not self.tracks_grad_norm
        norm = self.local_grad_norm() if measured_here else None
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
        return self.grad_norm() if measure_grad_norm and not measured_here else norm

    def clip_each_parameter(self, clip: float) -> float:
        """DINO's per-parameter clipping (:func:`clip_each_parameter`); the global norm before it."""
        return clip_each_parameter(self.module, self.engine.optimizer, self.dist, clip)

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
