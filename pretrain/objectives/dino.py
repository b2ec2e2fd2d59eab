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
import torch.nn.functional as F

from pretrain.data.views import MultiCropView
from pretrain.models.heads import DINOHead
from pretrain.objectives import base, monitors, ssl
from pretrain.objectives.monitors import embedding_std
from pretrain.sections import MAX_IMAGE_SIZE, ConfigError, require


# Bounds on what the checks before training build on the meta device (a tensor per size, a module per
# layer or crop), far above every published recipe (DINOv2: 131,072 prototypes, 3 layers, 8 local crops).
MAX_HEAD_DIM = 2**22
MAX_HEAD_LAYERS = 16
MAX_LOCAL_CROPS = 64

@dataclass
class Config(ssl.Config):
    name: str = "dino"
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    norm_last_layer: bool = True
    freeze_last_layer_epochs: float = 1.0
    freeze_last_layer_steps: int | None = None  # when set, replaces freeze_last_layer_epochs
    # How the prototypes are frozen: "skip" (DINO: no gradient, the optimizer leaves them and their
    # Adam moments alone) or "zero_lr" (DINOv2: they get gradients and step at lr 0, so their Adam
    # moments and step count run on).
    freeze_last_layer_by: Literal["skip", "zero_lr"] = "skip"
    momentum: float = 0.996  # teacher EMA momentum, cosine to 1
    center_momentum: float = 0.9
    student_temp: float = 0.1
    teacher_temp: float = 0.04  # at step 0, linear to teacher_temp_final over teacher_temp_warmup_epochs
    teacher_temp_final: float = 0.07
    teacher_temp_warmup_epochs: float = 30.0
    # When set, replaces teacher_temp_warmup_epochs: a warm-up in steps that another global batch or
    # data set does not move against an lr warm-up in steps (DINOv2's, in iterations).
    teacher_temp_warmup_steps: int | None = None
    global_scale: tuple[float, float] = (0.4, 1.0)  # global crops are data.image_size
    local_crops: int = 10
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    # Blur and solarize per crop kind as in the paper.
    blur: tuple[float, float, float] = (1.0, 0.1, 0.5)  # first global, second global, local crops
    solarize: float = 0.2  # second global crop only
    export: Literal["teacher", "student"] = "teacher"

    def validate(self) -> None:
        super().validate()
        self.require_positive("out_dim", "hidden_dim", "bottleneck_dim", "head_layers", "local_size",
                              "student_temp", "teacher_temp", "teacher_temp_final")
        for key in ("freeze_last_layer_steps", "teacher_temp_warmup_steps"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ConfigError(f"objective.{key}={getattr(self, key)!r}: must be >= 0 (or null for the "
                                  f"*_epochs key)")
        if self.local_crops < 0:
            raise ConfigError(f"objective.local_crops={self.local_crops}: must be >= 0")
        for key in ("freeze_last_layer_epochs", "teacher_temp_warmup_epochs"):
            require(getattr(self, key) >= 0, f"objective.{key}", getattr(self, key), "must be >= 0")
        self.require_at_most(MAX_HEAD_DIM, "out_dim", "hidden_dim", "bottleneck_dim")
        self.require_at_most(MAX_HEAD_LAYERS, "head_layers")
        self.require_at_most(MAX_LOCAL_CROPS, "local_crops")
        self.require_at_most(MAX_IMAGE_SIZE, "local_size")
        self.require_fractions("center_momentum", "solarize", "blur[0]", "blur[1]", "blur[2]")
        self.require_scales("global_scale", "local_scale")

    def validate_run(self, cfg) -> None:
        if self.local_crops and self.local_size != cfg.data.image_size and \
                not cfg.model.kwargs.get("dynamic_img_size", False):
            raise ConfigError(f"model.kwargs.dynamic_img_size: local crops of {self.local_size} px next to global "
                              f"crops of data.image_size={cfg.data.image_size} need model.kwargs.dynamic_img_size="
                              f"true (or objective.local_crops=0)")


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, student_temp: float,
              teacher_temp: float | torch.Tensor, global_crops: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
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


class Objective(ssl.Objective):
    def __init__(self, cfg, ctx: base.RunContext) -> None:
        super().__init__(cfg, ctx)
        o = cfg.objective
        self.build_networks(self.head_builders)
        self.register_buffer("center", torch.zeros(1, o.out_dim))
        self.photometric = self.photometric_per_crop(o.blur, (0.0, o.solarize, 0.0))
        spe = ctx.steps_per_epoch
        self.freeze_last_layer_steps = round(o.freeze_last_layer_epochs * spe) \
            if o.freeze_last_layer_steps is None else o.freeze_last_layer_steps
        self.teacher_temp_warmup_steps = round(o.teacher_temp_warmup_epochs * spe) \
            if o.teacher_temp_warmup_steps is None else o.teacher_temp_warmup_steps

    def head_builders(self, in_dim: int) -> dict:
        """Builders of the heads the student and the teacher hold next to the backbone, by name; each
        head's ``last_layer`` holds prototypes frozen for the first ``freeze_last_layer_epochs``."""
        o = self.cfg.objective
        return {"head": lambda: DINOHead(in_dim, o.out_dim, o.hidden_dim, o.bottleneck_dim, o.head_layers,
                                         o.norm_last_layer)}

    # -- schedules -------------------------------------------------------------------------------------
    def teacher_temp(self, step: int) -> float:
        o = self.cfg.objective
        if step >= self.teacher_temp_warmup_steps:
            return o.teacher_temp_final
        return o.teacher_temp + (o.teacher_temp_final - o.teacher_temp) * step / self.teacher_temp_warmup_steps

    def prototypes_detached(self, step: int) -> bool:
        """Whether no gradient reaches the prototypes at ``step`` (frozen by skipping them)."""
        return step < self.freeze_last_layer_steps and self.cfg.objective.freeze_last_layer_by == "skip"

    # -- data ------------------------------------------------------------------------------------------
    def train_view(self):
        o = self.cfg.objective
        return MultiCropView(self.cfg.data.image_size, o.global_scale, o.local_size, o.local_scale, o.local_crops,
                             o.hflip, o.interpolation)

    def global_inputs(self, batch: dict) -> torch.Tensor:
        """The two global crops of every image, augmented, crop-major (2B x C x H x W)."""
        crops = batch["global"]
        return torch.cat([self._inputs(crops[:, 0], self.photometric[0]),
                          self._inputs(crops[:, 1], self.photometric[1])])

    def and_local_features(self, global_features: torch.Tensor, batch: dict) -> torch.Tensor:
        """The student backbone's ``global_features`` followed by its features of the local crops."""
        if "local" not in batch:
            return global_features
        local = batch["local"].transpose(0, 1).flatten(0, 1)  # crop-major, like the global crops
        return torch.cat([global_features, self.student["backbone"](self._inputs(local, self.photometric[2]))])

    # -- training --------------------------------------------------------------------------------------
    def step_inputs(self, batch: dict, step: int) -> dict:
        # The prototypes' freeze is a flag of the graph: a second graph once they unfreeze.
        return {"teacher_temp": self.step_scalar(self.teacher_temp(step)), "frozen": self.prototypes_detached(step)}

    def micro_step(self, batch: dict, teacher_temp: torch.Tensor, frozen: bool):
        o = self.cfg.objective
        global_crops = self.global_inputs(batch)
        teacher_out = self.teacher("head", self.teacher("backbone", global_crops))
        features = self.and_local_features(self.student["backbone"](global_crops), batch)
        # The prototypes are frozen in the first epoch(s): no gradient here, no update (param_groups).
        student_out = self.student["head"](features, freeze_last_layer=frozen)
        loss, teacher_p = dino_loss(student_out, teacher_out, self.center, o.student_temp, teacher_temp)
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
        entropy = monitors.entropy(teacher_p).mean()
        batch_entropy = monitors.entropy(teacher_p.mean(0))
        student_logp = F.log_softmax(student_out[:len(teacher_out)].float() / o.student_temp, dim=-1)
        kl = (teacher_p * (teacher_p.clamp_min(1e-12).log() - student_logp)).sum(-1).mean()
        values = {"teacher_entropy": entropy / k, "teacher_batch_entropy": batch_entropy / k, "kl": kl,
                  "embedding_std": embedding_std(features[:len(teacher_out)]),
                  "center_norm": self.center.norm()}
        return values

    def collapse_limits(self) -> tuple[dict[str, float], dict[str, float]]:
        # Two ways to collapse: every image to one prototype (the batch's mean teacher output has
        # low entropy) or every output uniform (high entropy per image); both leave KL near 0.
        return ({"embedding_std": self.cfg.objective.collapse_std, "teacher_batch_entropy": 0.05, "kl": 1e-4},
                {"teacher_entropy": 0.99})

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
        groups (``freeze_steps``) until they unfreeze. With ``freeze_last_layer_by: zero_lr`` their
        groups step at lr 0 instead (``zero_lr_steps``), DINOv2's way."""
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
            how = "freeze_steps" if self.cfg.objective.freeze_last_layer_by == "skip" else "zero_lr_steps"
            out += [{**group, "params": frozen, how: self.freeze_last_layer_steps}] if frozen else []
        return out
