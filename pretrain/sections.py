"""The run configuration's vocabulary: ConfigError and :func:`require`, the numeric limits, each
section's dataclass (``ObjectiveConfig`` is the base of every objective's), the composed
:class:`Config`, and :func:`merge`.

Everything below :mod:`pretrain.config` imports these from here: the objectives, and all they
import (the models, the data views, the engine), since pretrain.config looks the objectives'
sections up in their modules (:data:`pretrain.objectives.OBJECTIVES`). Reading recipes, overrides
and the objective table stay in pretrain.config, which re-exports these names.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pretrain.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(UserError, ValueError):
    """A configuration problem, always naming the key or file it is about."""


def require(ok: bool, key: str, value: Any, why: str) -> None:
    """ConfigError naming ``key`` and its ``value`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0
    threads: int | None = None  # torch intra-op threads per process; None keeps torch's default

    def validate(self) -> None:
        require(self.threads is None or self.threads > 0, "run.threads", self.threads, "must be positive")
        # numpy's seed sequences and torch's generators take non-negative seeds below 2**63 (torch's bound).
        require(0 <= self.seed < 2**63, "run.seed", self.seed, "must be a non-negative integer below 2**63")


MAX_BLOCKS = 1024  # transformer blocks a model.kwargs may ask for
MAX_IMAGE_SIZE = 8192  # pixels a side: the checks before training decode an image of this size


@dataclass
class ModelConfig:
    name: str = "vit_small_patch16_224"  # any timm vit_* or swin_* name
    kwargs: dict = field(default_factory=dict)  # passed to timm.create_model (depth, embed_dim, window_size, ...)
    drop_path: float = 0.1
    grad_checkpointing: bool = False
    fused_attn: bool = True
    # How a ViT with dynamic_img_size resamples its position embedding for another input size (the
    # local crops): "timm" (bicubic with antialiasing, to the exact grid) or "dino" (DINO's and
    # DINOv2's interpolate_pos_encoding: bicubic by the scale factor (n + 0.1) / M, no antialiasing).
    pos_embed_interpolation: Literal["timm", "dino"] = "timm"

    def validate(self) -> None:
        require(self.name.startswith(("vit_", "swin_")), "model.name", self.name,
                "must be a timm vit_* or swin_* model")
        require(self.pos_embed_interpolation == "timm" or self.name.startswith("vit_"),
                "model.pos_embed_interpolation", self.pos_embed_interpolation,
                f"resamples a ViT's absolute position embedding; model.name={self.name!r} has none")
        # The checks before training build every block (on the meta device, but each block is still a
        # few kB of Python objects): a mistyped depth would exhaust memory before any message.
        for key in ("depth", "depths"):
            value = self.kwargs.get(key)
            counts = value if isinstance(value, list) else [value]
            if all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
                require(sum(counts) <= MAX_BLOCKS, f"model.kwargs.{key}", value,
                        f"more than {MAX_BLOCKS} blocks in all (the deepest ViTs have about 50)")
        require(0.0 <= self.drop_path < 1.0, "model.drop_path", self.drop_path, "must be in [0, 1)")


@dataclass
class DataConfig:
    train: str | list[str] | None = None  # a writer's output dir, a brace pattern, or a list of URLs
    val: str | list[str] | None = None
    # Write a built-in dataset (pretrain.data.builtin) into data.train's dir on first use.
    prepare: Literal["none", "digits", "skimage_patches"] = "none"
    synthetic: bool = False  # random uint8 batches instead of shards (benchmarks)
    num_classes: int | None = None  # taken from the shard index when None
    train_samples: int | None = None  # taken from the shard index when None
    batch_size: int = 64  # per process
    global_batch: int | None = None  # when set: batch_size = global_batch / (world size x train.grad_accum)
    val_batch_size: int | None = None  # defaults to batch_size
    workers: int = 4
    image_size: int = 224
    shuffle_buffer: int = 2000
    resampled: bool = False  # draw training shards with replacement (no exact epochs)
    max_skip_rate: float = 0.05  # stop when a rank has skipped more than this share of its samples
    shard_timeout: float = 300.0  # seconds a pipe: shard or remote request may stay silent before it is skipped
    # Parquet's image and label columns, when not under a name the reader looks for (image, img, jpg,
    # ...; label, labels, cls, fine_label, ...); "outer.inner" names a field of a struct column
    image_column: str | None = None
    label_column: str | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pin_memory: bool = True
    # Workers hand baseline JPEGs over undecoded, with their crop plan; the device decodes them
    # (nvJPEG on CUDA), crops, resizes and flips. Other formats are still decoded by the workers.
    decode_on_device: bool = False

    def validate(self) -> None:
        require(self.batch_size > 0, "data.batch_size", self.batch_size, "must be positive")
        require(self.global_batch is None or self.global_batch > 0, "data.global_batch", self.global_batch,
                "must be positive")
        require(self.val_batch_size is None or self.val_batch_size > 0, "data.val_batch_size",
                self.val_batch_size, "must be positive")
        require(self.workers >= 0, "data.workers", self.workers, "must be >= 0")
        require(self.image_size > 0, "data.image_size", self.image_size, "must be positive")
        require(self.image_size <= MAX_IMAGE_SIZE, "data.image_size", self.image_size, f"must be at most {MAX_IMAGE_SIZE}")
        require(self.train_samples is None or self.train_samples > 0, "data.train_samples", self.train_samples,
                "must be positive")
        require(self.shuffle_buffer >= 0, "data.shuffle_buffer", self.shuffle_buffer, "must be >= 0")
        require(0.0 <= self.max_skip_rate <= 1.0, "data.max_skip_rate", self.max_skip_rate, "must be in [0, 1]")
        require(self.shard_timeout > 0, "data.shard_timeout", self.shard_timeout, "must be positive (seconds)")
        require(all(s > 0 for s in self.std), "data.std", self.std, "must be positive")
        for key in ("image_column", "label_column"):
            name = getattr(self, key)
            require(name is None or (name.strip() == name and name and not name.startswith("__")), f"data.{key}",
                    name, "must be a column name (not empty, no surrounding spaces, not starting with '__')")
        require(self.num_classes is None or self.num_classes > 0, "data.num_classes", self.num_classes,
                "must be positive")
        require(self.train is not None or self.synthetic, "data.train", None,
                "is required (or set data.synthetic=true)")
        require(self.prepare == "none" or (isinstance(self.train, str) and self.train.strip() != ""), "data.prepare",
                self.prepare, "needs data.train to be the directory to write into")


@dataclass
class ObjectiveConfig:
    """Base of every objective's config; ``name`` picks the objective (see pretrain.objectives)."""

    name: str = "supervised"
    # Whether the objective keeps a momentum teacher that follows the student's fp32 master weights
    # in place (DINO, MoBY): those must then stay in memory (a class attribute, not a key).
    follows_fp32_masters = False
    # Whether the objective trains on the class labels (a class attribute): those must then be one
    # class index per image, not lists (multi-label) or absent.
    uses_labels = False

    def validate(self) -> None:
        pass

    def validate_run(self, cfg: "Config") -> None:
        """Checks that involve other sections (batch size, image size, ...)."""


@dataclass
class OptimConfig:
    lr: float | None = None  # absolute peak lr; when None, base_lr scaled by lr_scaling to the global batch
    base_lr: float = 1e-3
    base_batch: int = 1024
    # The scaling rule from base_batch to the global batch: "linear" (Goyal et al. 2017: DINO, MoBY,
    # SimMIM) or "sqrt" (DINOv2's sqrt_wrt_1024).
    lr_scaling: Literal["linear", "sqrt"] = "linear"
    min_lr: float = 1e-6
    # false: min_lr is absolute (DINO, DINOv2); true: it is per base_batch and follows lr_scaling, as
    # MoBY's and SimMIM's MIN_LR (per 512).
    scale_min_lr: bool = False
    # Where a group with an lr_scale (layer-wise decay) ends: "scaled" at min_lr x lr_scale (DINOv2's
    # schedule times its multiplier), "shared" at min_lr itself (timm's CosineLRScheduler, which each
    # group follows from its own peak to the same floor: SimMIM's fine-tuning).
    lr_floor: Literal["scaled", "shared"] = "scaled"
    weight_decay: float = 0.05
    weight_decay_end: float | None = None  # cosine weight-decay schedule to this value (DINO)
    warmup_steps: int = 0
    warmup_epochs: float = 0.0  # alternative to warmup_steps, converted with the epoch length
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # Parameters without weight decay: "1d" (at most one dimension: biases, norm weights, layer
    # scales), "timm" (what the timm models list in no_weight_decay(): ViT's position embedding and
    # tokens, Swin's relative-position tables), or a glob on the parameter's name in the objective
    # ("*pos_embed"). DINO and MoBY's official code exclude "1d" only.
    no_decay: list[str] = field(default_factory=lambda: ["1d", "timm"])

    def validate(self) -> None:
        require(self.lr is None or self.lr > 0, "optim.lr", self.lr, "must be positive")
        require(self.base_lr > 0, "optim.base_lr", self.base_lr, "must be positive")
        require(self.base_batch > 0, "optim.base_batch", self.base_batch, "must be positive")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        require(self.warmup_epochs >= 0, "optim.warmup_epochs", self.warmup_epochs, "must be >= 0")
        require(self.min_lr >= 0, "optim.min_lr", self.min_lr, "must be >= 0")
        require(self.weight_decay_end is None or self.weight_decay_end >= 0, "optim.weight_decay_end",
                 self.weight_decay_end, "must be >= 0")
        require(all(0 <= b < 1 for b in self.betas), "optim.betas", self.betas, "must be in [0, 1)")
        require(self.eps > 0, "optim.eps", self.eps, "must be positive")
        require(all(rule.strip() for rule in self.no_decay), "optim.no_decay", self.no_decay,
                 'entries must be "1d", "timm" or a glob on parameter names such as "*pos_embed"')
        require(not (self.warmup_steps and self.warmup_epochs), "optim.warmup_epochs", self.warmup_epochs,
                 "cannot be combined with optim.warmup_steps")


@dataclass
class TrainConfig:
    steps: int | None = None  # optimizer steps; exactly one of steps and epochs
    epochs: float | None = None
    stop_at: int | None = None  # end this run at this step; the schedules still span the whole run
    grad_accum: int = 1
    clip_grad: float | None = None
    # global: the norm of all gradients together is clipped to clip_grad (DeepSpeed's);
    # per_param: each parameter's gradient norm on its own (DINO's utils.clip_gradients)
    clip_mode: Literal["global", "per_param"] = "global"
    eval_every: int = 0  # steps; 0 evaluates only at the end
    ckpt_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    max_nonfinite: int = 5  # consecutive non-finite losses that stop the run
    resume: bool = True  # continue from run.dir's latest checkpoint when there is one
    # A checkpoint tag (step_00001000) to resume from when `latest` is absent or unreadable or the
    # checkpoint it names is refused (damaged, checksums differ); never used otherwise, so a requeue
    # with the same arguments resumes from latest.
    resume_from: str | None = None
    export: bool = True
    progress: bool = True

    def validate(self) -> None:
        require((self.steps is None) != (self.epochs is None), "train.steps", self.steps,
                "set exactly one of train.steps and train.epochs")
        require(self.steps is None or self.steps > 0, "train.steps", self.steps, "must be positive")
        require(self.epochs is None or self.epochs > 0, "train.epochs", self.epochs, "must be positive")
        require(self.stop_at is None or self.stop_at > 0, "train.stop_at", self.stop_at, "must be positive")
        require(self.grad_accum > 0, "train.grad_accum", self.grad_accum, "must be positive")
        require(self.clip_grad is None or self.clip_grad > 0, "train.clip_grad", self.clip_grad,
                "must be positive (or null for no clipping)")
        for key in ("eval_every", "ckpt_every"):
            require(getattr(self, key) >= 0, f"train.{key}", getattr(self, key), "must be >= 0")
        require(self.keep_last > 0, "train.keep_last", self.keep_last, "must be positive")
        require(self.resume_from is None or re.fullmatch(r"step_\d{8,}", str(self.resume_from)) is not None,
                "train.resume_from", self.resume_from, "must be a checkpoint tag like step_00001000")
        require(self.log_every > 0, "train.log_every", self.log_every, "must be positive")
        require(self.max_nonfinite > 0, "train.max_nonfinite", self.max_nonfinite, "must be positive")


@dataclass
class EngineConfig:
    # 0-3, or "auto": the lowest stage whose model states and activations fit the devices, chosen when
    # the run starts (pretrain.zero_stage; the offload settings narrow the choice to the stages they need)
    zero_stage: int | Literal["auto"] = 0
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    # bf16 as torch.autocast on fp32 weights (true: the fast path, no per-step casts or overflow checks)
    # or as DeepSpeed's bf16 (false: bf16 weights and gradients, fp32 masters; less memory under ZeRO);
    # auto: autocast at ZeRO 0-2, DeepSpeed's at ZeRO-3, and a resumed run keeps its checkpoint's mode.
    autocast: bool | Literal["auto"] = "auto"
    deepspeed: dict = field(default_factory=dict)  # raw DeepSpeed config, merged over the generated one
    compile: bool = False  # torch.compile the objective's step (the first steps then take minutes)
    # torch.compile's backend: inductor (generated kernels), aot_eager (traced forward and backward,
    # run by eager kernels: no code generation; for checks), eager (the captured graph run as is).
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    zero_init: bool = True  # ZeRO-3: build the model partitioned (deepspeed.zero.Init), never whole on a rank
    # ZeRO-Offload / ZeRO-Infinity: where the optimizer state (and with "all" the ZeRO-3 parameter
    # partitions) live: host memory, or files under offload_path (NVMe; ZeRO-3 only).
    offload: Literal["none", "optimizer", "all"] = "none"
    offload_path: str | None = None

    def validate(self) -> None:
        require(self.zero_stage in (0, 1, 2, 3, "auto"), "engine.zero_stage", self.zero_stage,
                "must be 0, 1, 2, 3 or auto")
        require(self.autocast in (True, False, "auto"), "engine.autocast", self.autocast, "must be true, false or auto")
        require(self.autocast is not True or self.precision == "bf16", "engine.autocast", self.autocast,
                f"autocasts to bf16 only (engine.precision is {self.precision}: fp16 trains with DeepSpeed's loss "
                f"scaling, fp32 needs no autocast)")
        require(self.compile or self.compile_backend == "inductor", "engine.compile_backend", self.compile_backend,
                "is the backend of engine.compile; set engine.compile=true")
        auto = self.zero_stage == "auto"
        require(self.offload == "none" or auto or self.zero_stage > 0, "engine.offload", self.offload,
                "offloads the state ZeRO partitions; needs engine.zero_stage 1, 2 or 3, or auto (it is 0)")
        require(self.offload != "all" or auto or self.zero_stage == 3, "engine.offload", self.offload,
                f"offloads parameters too, which only ZeRO-3 partitions; needs engine.zero_stage=3 "
                f"(it is {self.zero_stage}), or engine.offload=optimizer")
        require(self.offload_path is None or self.offload != "none", "engine.offload_path", self.offload_path,
                "is where engine.offload writes; set engine.offload=optimizer or all")
        require(self.offload_path is None or auto or self.zero_stage == 3, "engine.offload_path", self.offload_path,
                f"offload to NVMe (ZeRO-Infinity) needs engine.zero_stage=3 or auto (it is {self.zero_stage})")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self) -> None:
        for section in dataclasses.fields(self):
            value = getattr(self, section.name)
            if dataclasses.is_dataclass(value):  # sections; a later stage's subclass may add plain keys
                value.validate()
        if self.objective.follows_fp32_masters and self.engine.offload_path and self.engine.offload == "all":
            raise ConfigError(f"engine.offload=all with engine.offload_path={self.engine.offload_path!r}: objective."
                              f"name={self.objective.name!r} keeps a momentum teacher that follows the student's "
                              f"weights, which would then all be on NVMe; use engine.offload=optimizer (the teacher "
                              f"follows the student's bf16 partitions) or no engine.offload_path")
        self.objective.validate_run(self)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def merge(base: dict, diff: dict) -> dict:
    """``diff`` over ``base``, recursively for mappings (a recipe over its base recipe, ``engine.deepspeed``
    over the DeepSpeed config the engine generates)."""
    out = dict(base)
    for key, value in diff.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _plain(value: Any) -> Any:
    """Tuples to lists, so the saved YAML is plain and loads back unchanged."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
