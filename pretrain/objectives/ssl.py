"""What the self-supervised objectives with a momentum teacher share (DINO, DINOv2, MoBY).

A student (a backbone and heads, trained by the optimizer) and a momentum teacher (an EMA of the
student's backbone and some of its heads, see pretrain.models.teacher) whose momentum follows a
cosine to 1; crops made in the data workers and augmented photometrically on the device; collapse
monitors; the export of either network's backbone. Each objective keeps its own names for the two
networks and the backbone: they are the keys of its checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
import torch.nn as nn

from pretrain.data.transforms import normalize
from pretrain.data.views import Photometric
from pretrain.models.backbone import create_backbone
from pretrain.models.teacher import MomentumTeacher
from pretrain.objectives import base
from pretrain.objectives.monitors import CollapseWatch
from pretrain.schedules import cosine
from pretrain.sections import ObjectiveConfig, require


@dataclass
class Config(ObjectiveConfig):
    """The keys every momentum-teacher objective has; each objective sets its own defaults."""

    follows_fp32_masters = True  # the momentum teacher
    momentum: float = 0.996  # teacher EMA momentum at step 0, cosine to 1
    hflip: float = 0.5
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    # Photometric augmentation on the device (blur and solarize are per crop, in each objective).
    jitter: float = 0.8
    grayscale: float = 0.2
    collapse_std: float = 0.05  # warn when embedding_std (about 1 when spread out) falls below this

    def validate(self) -> None:
        self.require_fractions("momentum", "hflip", "jitter", "grayscale")
        require(self.collapse_std >= 0, "objective.collapse_std", self.collapse_std, "must be >= 0")

    def _value(self, key: str):
        """The value of ``key``, which may name an element (``blur[1]``)."""
        name, _, index = key.partition("[")
        return getattr(self, name)[int(index[:-1])] if index else getattr(self, name)

    def require_positive(self, *keys: str) -> None:
        for key in keys:
            require(self._value(key) > 0, f"objective.{key}", self._value(key), "must be positive")

    def require_at_most(self, bound: int, *keys: str) -> None:
        """Sizes the checks before training build (as many modules, or tensors on the meta device)."""
        for key in keys:
            require(self._value(key) <= bound, f"objective.{key}", self._value(key), f"must be at most {bound}")

    def require_fractions(self, *keys: str) -> None:
        for key in keys:
            require(0.0 <= self._value(key) <= 1.0, f"objective.{key}", self._value(key), "must be in [0, 1]")

    def require_scales(self, *keys: str) -> None:
        """Crop scales: ``(min, max)`` shares of the image's area."""
        for key in keys:
            low, high = self._value(key)
            require(0 < low <= high <= 1, f"objective.{key}", [low, high], "need 0 < min <= max <= 1")


class Objective(base.Objective):
    # The attribute names of the two networks and the backbone's name inside each: the keys of the
    # objective's state dict, hence of its checkpoints.
    student_name, teacher_name, backbone_name = "student", "teacher", "backbone"
    teacher_export = "teacher"  # the value of objective.export that exports the teacher's backbone

    def __init__(self, cfg, ctx: base.RunContext) -> None:
        super().__init__(cfg, ctx)
        self.watch = CollapseWatch(cfg.train.log_every, ctx.dist.is_main)

    def build_networks(self, heads: Callable[[int], dict[str, Callable[[], nn.Module]]],
                       student_only: dict[str, Callable[[], nn.Module]] | None = None) -> None:
        """Sets the student (a backbone, the heads that ``heads(backbone features)`` builds, then the
        ``student_only`` heads) and the teacher (a momentum copy of the backbone and ``heads``)."""
        cfg = self.cfg
        make_backbone = lambda: create_backbone(cfg.model, cfg.data.image_size, 0)  # noqa: E731
        backbone = make_backbone()
        builders = {self.backbone_name: make_backbone, **heads(backbone.num_features)}
        student = nn.ModuleDict({self.backbone_name: backbone,
                                 **{name: build() for name, build in builders.items() if name != self.backbone_name},
                                 **{name: build() for name, build in (student_only or {}).items()}})
        setattr(self, self.student_name, student)
        setattr(self, self.teacher_name, MomentumTeacher({name: student[name] for name in builders}, self.ctx.dist,
                                                         builders))

    def momentum_teacher(self) -> MomentumTeacher:
        return getattr(self, self.teacher_name)

    # -- schedules and views ---------------------------------------------------------------------------
    def momentum(self, step: int) -> float:
        return cosine(step, self.ctx.total_steps, self.cfg.objective.momentum, 1.0)

    def photometric_per_crop(self, blur: Sequence[float], solarize: Sequence[float]) -> tuple[Photometric, ...]:
        """One photometric augmentation per kind of crop, with its own blur and solarize probabilities."""
        o = self.cfg.objective
        return tuple(Photometric(jitter=o.jitter, grayscale=o.grayscale, blur=b, solarize=s)
                     for b, s in zip(blur, solarize))

    def _inputs(self, images: torch.Tensor, photometric: Photometric) -> torch.Tensor:
        """uint8 crops -> augmented, normalized crops in the compute dtype."""
        d = self.cfg.data
        return normalize(photometric(images).mul_(255.0), d.mean, d.std, self.ctx.compute_dtype)

    # -- training --------------------------------------------------------------------------------------
    def forward(self, batch: dict, step: int):
        loss, metrics = super().forward(batch, step)
        self.watch.record(metrics)  # outside the compiled step: the watch reads them at log steps
        return loss, metrics

    # -- after each step -------------------------------------------------------------------------------
    def after_step(self, step: int, engine) -> None:
        self.momentum_teacher().update(self.momentum(step), engine)
        self.watch.check(step, *self.collapse_limits())

    def collapse_limits(self) -> tuple[dict[str, float], dict[str, float]]:
        """(lower, upper) limits of the monitors that warn of a collapse (pretrain.objectives.monitors)."""
        return {"embedding_std": self.cfg.objective.collapse_std}, {}

    # -- export ----------------------------------------------------------------------------------------
    def exports_teacher(self) -> bool:
        return self.cfg.objective.export == self.teacher_export

    def backbone(self) -> nn.Module:
        nets = self.momentum_teacher().nets if self.exports_teacher() else getattr(self, self.student_name)
        return nets[self.backbone_name]

    def backbone_state_dict(self, engine, main_only: bool = False) -> dict[str, torch.Tensor]:
        if self.exports_teacher():
            return self.momentum_teacher().full_state_dict(self.backbone_name, main_only)
        return super().backbone_state_dict(engine, main_only)
