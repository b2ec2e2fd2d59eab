"""Configs of the three stages, loaded and checked like pre-training's (pretrain.config).

``full`` is pre-training's ``Config`` plus ``pretrained`` and a ``finetune`` section, so the same
trainer runs it. ``linear`` and ``knn`` share the sections that describe the frozen features.
``pretrained`` is a top-level key: ``python -m finetune linear RECIPE pretrained=RUN_DIR``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from pretrain.config import Config, DataConfig, ModelConfig, RunConfig, require


def _check_pretrained(cfg) -> None:
    require(cfg.pretrained is None or cfg.pretrained.strip() != "", "pretrained", cfg.pretrained,
            "must be a path (or null for random initialization)")


@dataclass
class FinetuneSection:
    """What full fine-tuning adds to supervised training."""

    checkpoint_key: str | None = None  # entry of the checkpoint file holding the weights (DINO: teacher)
    head: Literal["new", "keep", "map"] = "new"  # map: the stored head's rows named by class_map
    class_map: str | None = None  # one source-class index per line, e.g. ImageNet-22K -> 1K
    # Swin relative-position tables at a new window: timm's geometric resampling, or the official
    # Swin code's bicubic interpolation of the table
    relpos_interpolation: Literal["geometric", "bicubic"] = "geometric"
    layer_decay: float | None = None  # layer-wise lr decay (timm's group_matcher); None: one lr
    # A new classifier's initial weights and bias times this (BEiT's and SimMIM's init_scale 0.001)
    head_init_scale: float = 1.0
    ema: float = 0.0  # EMA decay of the weights, evaluated beside them; 0 turns it off
    keep_best: bool = True  # export the weights with the best val/top1 into RUN_DIR/best

    def validate(self) -> None:
        require(self.head != "map" or self.class_map, "finetune.class_map", self.class_map,
                "is required with finetune.head=map")
        require(self.layer_decay is None or 0 < self.layer_decay <= 1, "finetune.layer_decay",
                self.layer_decay, "must be in (0, 1]")
        require(0 <= self.ema < 1, "finetune.ema", self.ema, "must be in [0, 1)")
        require(self.head_init_scale > 0, "finetune.head_init_scale", self.head_init_scale, "must be positive")
        require(self.head_init_scale == 1.0 or self.head == "new", "finetune.head_init_scale", self.head_init_scale,
                f"scales a new classifier; finetune.head={self.head!r} loads a stored one")


@dataclass
class FullConfig(Config):
    pretrained: str | None = None  # export, run dir, DeepSpeed checkpoint or weights file; None: random init
    reference: bool = False  # also run from random init, fit raw pixels, and print both beside the result
    finetune: FinetuneSection = field(default_factory=FinetuneSection)

    def validate(self) -> None:
        super().validate()
        self.finetune.validate()
        _check_pretrained(self)
        require(not (self.finetune.ema and self.engine.zero_stage == 3), "finetune.ema", self.finetune.ema,
                "needs whole weights on every rank: use engine.zero_stage <= 2")


@dataclass
class FeaturesConfig:
    """Which frozen features to compute and where to cache them."""

    blocks: list[int] = field(default_factory=lambda: [1, 4])  # ViT: CLS tokens of the last n blocks
    avgpool: list[bool] = field(default_factory=lambda: [False, True])  # ViT: with the mean patch token
    stages: list[int] = field(default_factory=lambda: [1])  # Swin: mean of the last n stages
    crop_pct: float = 0.875
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    cache: str | None = None  # defaults to RUN_DIR/features
    dtype: Literal["float32", "float16"] = "float32"

    def validate(self) -> None:
        require(bool(self.blocks) and all(n > 0 for n in self.blocks), "features.blocks", self.blocks,
                "must list positive block counts")
        require(bool(self.avgpool), "features.avgpool", self.avgpool, "must list at least one choice")
        require(bool(self.stages) and all(n > 0 for n in self.stages), "features.stages", self.stages,
                "must list positive stage counts")
        require(0 < self.crop_pct <= 1, "features.crop_pct", self.crop_pct, "must be in (0, 1]")


@dataclass
class LinearSection:
    lrs: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0])
    base_batch: int = 256  # lrs are per base_batch samples (DINO: lr 0.001 per 256)
    epochs: int = 10
    batch_size: int = 256  # per process
    momentum: float = 0.9
    weight_decay: float = 0.0
    batchnorm: bool = False  # BatchNorm without affine before each head (MAE)
    augment: bool = False  # DINO's protocol: features of new random crops every step instead of the cache
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random resized crops with linear.augment

    def validate(self) -> None:
        require(bool(self.lrs) and all(lr > 0 for lr in self.lrs), "linear.lrs", self.lrs,
                "must list positive learning rates")
        for key in ("base_batch", "epochs", "batch_size"):
            require(getattr(self, key) > 0, f"linear.{key}", getattr(self, key), "must be positive")
        require(0 <= self.momentum < 1, "linear.momentum", self.momentum, "must be in [0, 1)")
        require(self.weight_decay >= 0, "linear.weight_decay", self.weight_decay, "must be >= 0")
        require(0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "linear.crop_scale", list(self.crop_scale),
                "need 0 < min <= max <= 1")


@dataclass
class KnnSection:
    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07
    chunk: int = 1024  # test features compared at once

    def validate(self) -> None:
        require(bool(self.ks) and all(k > 0 for k in self.ks), "knn.ks", self.ks, "must list positive k")
        require(self.temperature > 0, "knn.temperature", self.temperature, "must be positive")
        require(self.chunk > 0, "knn.chunk", self.chunk, "must be positive")


@dataclass
class ProbeConfig:
    """Shared by ``linear`` and ``knn``: a frozen backbone and the features it gives."""

    pretrained: str | None = None
    checkpoint_key: str | None = None
    reference: bool = False  # also probe the same model at random init and raw pixels, printed beside it
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # used when the weights do not name their model
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)

    def validate(self) -> None:
        for section in dataclasses.fields(self):
            value = getattr(self, section.name)
            if dataclasses.is_dataclass(value):
                value.validate()
        require(self.pretrained is not None and self.pretrained.strip() != "", "pretrained", self.pretrained,
                "is required: pretrained=RUN_DIR (or an export, checkpoint or weights file)")
        require(self.data.val is not None, "data.val", None, "is required: the probe is measured on it")

    def to_dict(self) -> dict:
        return Config.to_dict(self)


@dataclass
class LinearConfig(ProbeConfig):
    linear: LinearSection = field(default_factory=LinearSection)


@dataclass
class KnnConfig(ProbeConfig):
    knn: KnnSection = field(default_factory=KnnSection)


ROOTS = {"full": FullConfig, "linear": LinearConfig, "knn": KnnConfig}
