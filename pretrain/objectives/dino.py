"""DINO (Caron et al. 2021): self-distillation with a momentum teacher, centering and sharpening.

Student = backbone + DINO head on every crop; teacher = EMA of the student (see
pretrain.models.teacher) on the two global crops only. The loss is the cross-entropy between the
teacher's centred, sharpened softmax and the student's softmax over every (teacher crop, student
crop) pair of different crops. The centre is an EMA of the teacher's mean output over all ranks.

Multi-crop with one backbone needs ``model.kwargs.dynamic_img_size: true`` whenever the local crops
differ in size from ``data.image_size``: timm's ViT then interpolates its position embedding, and
timm's Swin pads each stage to whole windows and builds its shift masks for the input it gets.
Windows stay at ``window_size`` with their relative-position tables, and which stages shift is
decided by the 224-px layout: a 96-px crop on Swin-T/4/7 gives 24, 12, 6 and 3 tokens a side,
padded to 28, 14, 7 and 7. The padding tokens are zeros that attention does not mask out (timm's
behaviour). A smaller window that divides every local stage would avoid the padding but breaks the
224-px layout (56, 28, 14, 7 tokens) and the relative-position tables of pretrained weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import ConfigError, ObjectiveConfig
from pretrain.data.transforms import normalize
from pretrain.data.views import MultiCropView, Photometric
from pretrain.models.backbone import create_backbone
from pretrain.models.heads import DINOHead
from pretrain.models.teacher import MomentumTeacher
from pretrain.objectives import base
from pretrain.objectives.monitors import CollapseWatch, embedding_std
from pretrain.schedules import cosine


@dataclass
class Config(ObjectiveConfig):
    name: str = "dino"
    follows_fp32_masters = True  # the momentum teacher
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    norm_last_layer: bool = True
    freeze_last_layer_epochs: float = 1.0
    momentum: float = 0.996  # teacher EMA momentum, cosine to 1
    center_momentum: float = 0.9
    student_temp: float = 0.1
    teacher_temp: float = 0.04  # at step 0, linear to teacher_temp_final over teacher_temp_warmup_epochs
    teacher_temp_final: float = 0.07
    teacher_temp_warmup_epochs: float = 30.0
    global_scale: tuple[float, float] = (0.4, 1.0)  # global crops are data.image_size
    local_crops: int = 10
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    hflip: float = 0.5
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    # Photometric augmentation on the device; blur and solarize per crop kind as in the paper.
    jitter: float = 0.8
    grayscale: float = 0.2
    blur: tuple[float, float, float] = (1.0, 0.1, 0.5)  # first global, second global, local crops
    solarize: float = 0.2  # second global crop only
    export: Literal["teacher", "student"] = "teacher"
    collapse_std: float = 0.05  # warn when embedding_std (about 1 when spread out) falls below this

    def validate(self) -> None:
        for key in ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers", "local_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"objective.{key}={getattr(self, key)!r}: must be positive")
        if self.local_crops < 0:
            raise ConfigError(f"objective.local_crops={self.local_crops}: must be >= 0")
        for key in ("momentum", "center_momentum"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"objective.{key}={getattr(self, key)!r}: must be in [0, 1]")
        for key in ("student_temp", "teacher_temp", "teacher_temp_final"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"objective.{key}={getattr(self, key)!r}: must be positive")
        for key in ("global_scale", "local_scale"):
            low, high = getattr(self, key)
            if not 0 < low <= high <= 1:
                raise ConfigError(f"objective.{key}={[low, high]}: need 0 < min <= max <= 1")
        for key in ("hflip", "jitter", "grayscale", "solarize", *[f"blur[{i}]" for i in range(3)]):
            value = self.blur[int(key[5])] if key.startswith("blur") else getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"objective.{key}={value!r}: must be in [0, 1]")

    def validate_run(self, cfg) -> None:
        if self.local_crops and self.local_size != cfg.data.image_size and \
                not cfg.model.kwargs.get("dynamic_img_size", False):
            raise ConfigError(f"model.kwargs.dynamic_img_size: local crops of {self.local_size} px next to global "
                              f"crops of data.image_size={cfg.data.image_size} need model.kwargs.dynamic_img_size="
                              f"true (or objective.local_crops=0)")


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, student_temp: float,
              teacher_temp: float, global_crops: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, teacher probabilities). ``student``: logits of every crop, crop-major ((crops * B) x K);
    ``teacher``: logits of the global crops, crop-major ((global_crops * B) x K)."""
    teacher_p = F.softmax((teacher.float() - center) / teacher_temp, dim=-1)
    return dino_cross_entropy(student, teacher_p, student_temp, global_crops), teacher_p


def dino_cross_entropy(student: torch.Tensor, teacher_p: torch.Tensor, student_temp: float,
                       global_crops: int = 2) -> torch.Tensor:
    """The cross-entropy between the teacher's probabilities of each global crop and the student's
    softmax of every other crop, averaged over images and pairs. ``student``: logits, crop-major
    ((crops * B) x K); ``teacher_p``: probabilities of the global crops, crop-major."""
    student_logp = F.log_softmax(student.float() / student_temp, dim=-1).chunk(len(student) // (len(teacher_p)
                                                                                                  // global_crops))
    total, pairs = 0.0, 0
    for t_index, t in enumerate(teacher_p.chunk(global_crops)):
        for s_index, s in enumerate(student_logp):
            if s_index == t_index:
                continue  # no loss between a crop and itself
            total = total + torch.sum(-t * s, dim=-1).mean()
            pairs += 1
    return total / pairs


class Objective(base.Objective):
    def __init__(self, cfg, ctx: base.RunContext) -> None:
        super().__init__(cfg, ctx)
        o = cfg.objective
        backbone = create_backbone(cfg.model, cfg.data.image_size, 0)
        builders = {"backbone": lambda: create_backbone(cfg.model, cfg.data.image_size, 0),
                    **self.head_builders(backbone.num_features)}
        self.student = nn.ModuleDict({"backbone": backbone,
                                      **{name: build() for name, build in builders.items() if name != "backbone"}})
        self.teacher = MomentumTeacher(dict(self.student.items()), ctx.dist, builders)
        self.register_buffer("center", torch.zeros(1, o.out_dim))
        photo = dict(jitter=o.jitter, grayscale=o.grayscale)
        self.photometric = (Photometric(**photo, blur=o.blur[0]),
                            Photometric(**photo, blur=o.blur[1], solarize=o.solarize),
                            Photometric(**photo, blur=o.blur[2]))
        spe = ctx.steps_per_epoch
        self.freeze_last_layer_steps = round(o.freeze_last_layer_epochs * spe)
        self.teacher_temp_warmup_steps = round(o.teacher_temp_warmup_epochs * spe)
        self.watch = CollapseWatch(cfg.train.log_every, ctx.dist.is_main)

    def head_builders(self, in_dim: int) -> dict:
        """Builders of the heads the student and the teacher hold next to the backbone, by name; each
        head's ``last_layer`` holds prototypes frozen for the first ``freeze_last_layer_epochs``."""
        o = self.cfg.objective
        return {"head": lambda: DINOHead(in_dim, o.out_dim, o.hidden_dim, o.bottleneck_dim, o.head_layers,
                                         o.norm_last_layer)}

    # -- schedules -------------------------------------------------------------------------------------
    def momentum(self, step: int) -> float:
        return cosine(step, self.ctx.total_steps, self.cfg.objective.momentum, 1.0)

    def teacher_temp(self, step: int) -> float:
        o = self.cfg.objective
        if step >= self.teacher_temp_warmup_steps:
            return o.teacher_temp_final
        return o.teacher_temp + (o.teacher_temp_final - o.teacher_temp) * step / self.teacher_temp_warmup_steps

    # -- data ------------------------------------------------------------------------------------------
    def train_view(self):
        o = self.cfg.objective
        return MultiCropView(self.cfg.data.image_size, o.global_scale, o.local_size, o.local_scale, o.local_crops,
                             o.hflip, o.interpolation)

    def _inputs(self, images: torch.Tensor, photometric: Photometric) -> torch.Tensor:
        """uint8 crops -> augmented, normalized crops in the backbone's dtype."""
        d = self.cfg.data
        dtype = self.student["head"].mlp[0].weight.dtype
        return normalize(photometric(images).mul_(255.0), d.mean, d.std, dtype)

    # -- training --------------------------------------------------------------------------------------
    def forward(self, batch: dict, step: int):
        o = self.cfg.objective
        crops = batch["global"]
        global_crops = torch.cat([self._inputs(crops[:, 0], self.photometric[0]),
                                  self._inputs(crops[:, 1], self.photometric[1])])
        teacher_out = self.teacher("head", self.teacher("backbone", global_crops))
        features = [self.student["backbone"](global_crops)]
        if "local" in batch:
            local = batch["local"].transpose(0, 1).flatten(0, 1)  # crop-major, like the global crops
            features.append(self.student["backbone"](self._inputs(local, self.photometric[2])))
        features = torch.cat(features)
        # The prototypes are frozen in the first epoch(s): no gradient here, no update (param_groups).
        student_out = self.student["head"](features, freeze_last_layer=step < self.freeze_last_layer_steps)
        loss, teacher_p = dino_loss(student_out, teacher_out, self.center, o.student_temp, self.teacher_temp(step))
        metrics = self._monitors(student_out, teacher_out, teacher_p, features)
        self._update_center(teacher_out)
        return loss, metrics

    @torch.no_grad()
    def _update_center(self, teacher_out: torch.Tensor) -> None:
        total = teacher_out.float().sum(dim=0, keepdim=True)
        self.ctx.dist.all_reduce(total)
        mean = total / (len(teacher_out) * self.ctx.dist.world_size)
        self.center.mul_(self.cfg.objective.center_momentum).add_(mean, alpha=1 - self.cfg.objective.center_momentum)

    @torch.no_grad()
    def _monitors(self, student_out, teacher_out, teacher_p, features) -> dict[str, torch.Tensor]:
        o = self.cfg.objective
        k = math.log(teacher_p.shape[-1])
        entropy = -(teacher_p * teacher_p.clamp_min(1e-12).log()).sum(-1).mean()
        mean_p = teacher_p.mean(0)
        batch_entropy = -(mean_p * mean_p.clamp_min(1e-12).log()).sum()
        student_logp = F.log_softmax(student_out[:len(teacher_out)].float() / o.student_temp, dim=-1)
        kl = (teacher_p * (teacher_p.clamp_min(1e-12).log() - student_logp)).sum(-1).mean()
        values = {"teacher_entropy": entropy / k, "teacher_batch_entropy": batch_entropy / k, "kl": kl,
                  "embedding_std": embedding_std(features[:len(teacher_out)]),
                  "center_norm": self.center.norm()}
        self.watch.record(values)
        return values

    def after_step(self, step: int, engine) -> None:
        self.teacher.update(self.momentum(step), engine)
        # Two ways to collapse: every image to one prototype (the batch's mean teacher output has
        # low entropy) or every output uniform (high entropy per image); both leave KL near 0.
        self.watch.check(step, low={"embedding_std": self.cfg.objective.collapse_std,
                                    "teacher_batch_entropy": 0.05, "kl": 1e-4},
                         high={"teacher_entropy": 0.99})

    # -- parameters ------------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """The prototypes (the head's last layer) in groups of their own, frozen for the first
        ``freeze_last_layer_epochs``.

        DINO's official code sets their gradients to None during that epoch, so torch's AdamW skips
        them entirely: no update, no weight decay, and their Adam moments and step count start when
        they start learning. Detaching them in the forward alone is not that: ZeRO hands the
        optimizer a zero gradient for them instead, so weight decay still shrinks them and their
        step count runs on, and on unfreezing Adam's bias correction no longer offsets the
        moments' cold start: after a long freeze (1,250 steps for ImageNet at batch 1024) the first
        updates come out several times larger than lr. So the forward detaches them (no gradient
        is computed, and none enters the norm that clipping measures) and the engine skips their
        groups (``freeze_steps``) until they unfreeze."""
        groups = super().param_groups()
        if not self.freeze_last_layer_steps:
            return groups
        last = {id(p) for name, head in self.student.items() if name != "backbone"
                for p in head.last_layer.parameters()}
        out = []
        for group in groups:
            rest = [p for p in group["params"] if id(p) not in last]
            frozen = [p for p in group["params"] if id(p) in last]
            out += [{**group, "params": rest}] if rest else []
            out += [{**group, "params": frozen, "freeze_steps": self.freeze_last_layer_steps}] if frozen else []
        return out

    def backbone(self) -> nn.Module:
        if self.cfg.objective.export == "teacher":
            return self.teacher.nets["backbone"]
        return self.student["backbone"]

    def backbone_state_dict(self, engine, main_only: bool = False) -> dict[str, torch.Tensor]:
        if self.cfg.objective.export == "teacher":
            return self.teacher.full_state_dict("backbone", main_only)
        return super().backbone_state_dict(engine, main_only)
