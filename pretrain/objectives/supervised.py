"""Supervised classification: soft-target cross-entropy with Mixup/CutMix and label smoothing.

The classifier is the timm model's own head, sized from the dataset's classes (21,841 for
ImageNet-21K). Random erasing and Mixup run on the device, on the normalized batch, drawing on the
device (pretrain.data.erasing, pretrain.data.mixing: timm's recipes, without host syncs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from pretrain.data.erasing import RandomErasing
from pretrain.data.mixing import MixupCutmix
from pretrain.data.transforms import EvalView, SupervisedTrainView, normalize
from pretrain.models.backbone import create_backbone
from pretrain.objectives import base
from pretrain.sections import ConfigError, ObjectiveConfig


@dataclass
class Config(ObjectiveConfig):
    name: str = "supervised"
    uses_labels = True
    label_smoothing: float = 0.1
    mixup: float = 0.8  # Beta(alpha, alpha) for Mixup; 0 turns it off
    cutmix: float = 1.0  # Beta(alpha, alpha) for CutMix; 0 turns it off
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4  # used when auto_augment is null
    interpolation: Literal["bicubic", "bilinear", "random"] = "bicubic"
    reprob: float = 0.25  # random erasing probability
    remode: Literal["pixel", "rand", "const"] = "pixel"
    crop_pct: float = 0.875  # validation: centre crop of the short side resized to size / crop_pct

    def validate(self) -> None:
        for key in ("label_smoothing", "mixup_prob", "mixup_switch_prob", "hflip", "reprob"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"objective.{key}={value!r}: must be in [0, 1]")
        for key in ("mixup", "cutmix", "color_jitter"):
            if getattr(self, key) < 0:
                raise ConfigError(f"objective.{key}={getattr(self, key)!r}: must be >= 0")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ConfigError(f"objective.scale={list(self.scale)}: need 0 < min <= max <= 1")
        if not 0 < self.crop_pct <= 1:
            raise ConfigError(f"objective.crop_pct={self.crop_pct}: must be in (0, 1]")

    @property
    def uses_mixup(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0

    def validate_run(self, cfg) -> None:
        if cfg.data.decode_on_device and (self.auto_augment or self.color_jitter):
            raise ConfigError(f"data.decode_on_device=true: objective.auto_augment={self.auto_augment!r} and "
                              f"objective.color_jitter={self.color_jitter} work on decoded images in the data "
                              f"workers; set objective.auto_augment=null objective.color_jitter=0")
        if self.uses_mixup and cfg.data.batch_size % 2:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size}: Mixup/CutMix needs an even batch (each "
                              f"image is mixed with its mirror in the batch; or objective.mixup=0 objective.cutmix=0)")


class Objective(base.Objective):
    compiled_steps = ("micro_step", "val_sums")

    def __init__(self, cfg, ctx: base.RunContext) -> None:
        super().__init__(cfg, ctx)
        o = cfg.objective
        self.model = create_backbone(cfg.model, cfg.data.image_size, ctx.num_classes)
        self.mixup = None
        if o.uses_mixup:
            self.mixup = MixupCutmix(o.mixup, o.cutmix, o.mixup_prob, o.mixup_switch_prob, o.mixup_mode,
                                     o.label_smoothing, ctx.num_classes)
        self.erasing = RandomErasing(o.reprob, o.remode) if o.reprob else None
        self.soft_ce = SoftTargetCrossEntropy()

    def backbone(self):
        return self.model

    def train_view(self):
        o, d = self.cfg.objective, self.cfg.data
        return SupervisedTrainView(d.image_size, o.scale, o.ratio, o.hflip, o.auto_augment, o.color_jitter,
                                   o.interpolation, d.mean)

    def eval_view(self):
        return EvalView(self.cfg.data.image_size, self.cfg.objective.crop_pct)

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.cfg.data.mean, self.cfg.data.std, torch.float32)

    def micro_step(self, batch: dict):
        images, labels = self._inputs(batch["image"]), batch["label"]
        if self.erasing is not None:
            images = self.erasing(images)
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        else:
            # F.one_hot checks the labels' range on the host (two syncs); the scatter checks on the device.
            targets = torch.zeros(len(labels), self.ctx.num_classes, device=labels.device).scatter_(
                1, labels[:, None], 1.0)
            smoothing = self.cfg.objective.label_smoothing
            targets = targets * (1.0 - smoothing) + smoothing / self.ctx.num_classes
        logits = self.model(images.to(self.ctx.compute_dtype))
        return self.soft_ce(logits.float(), targets), {}

    @torch.no_grad()
    def val_step(self, batch: dict) -> dict[str, torch.Tensor]:
        # self.model is read here, outside the compiled sums: a subclass may swap in other weights (an EMA).
        return self.val_sums(self.model, batch)

    def val_sums(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        images, labels = self._inputs(batch["image"]), batch["label"]
        logits = model(images.to(self.ctx.compute_dtype)).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5.eq(labels[:, None])
        return {"loss": F.cross_entropy(logits, labels, reduction="sum"),
                "top1": hits[:, 0].sum().float(), "top5": hits.any(dim=1).sum().float(),
                "count": torch.full((), float(len(labels)), device=logits.device)}
