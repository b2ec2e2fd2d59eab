"""DINOv2 (Oquab et al. 2023): DINO's image loss + iBOT's masked-patch loss + the KoLeo regulariser.

Built on DINO (pretrain.objectives.dino): the same multi-crop views, photometric augmentation, DINO
head, momentum teacher (an EMA of the student's fp32 masters, exact under every ZeRO stage),
schedules, frozen prototypes and export. What DINOv2 adds:

* half of the global crops of a batch are masked, block-wise as DINOv2's ``MaskingGenerator``
  draws them (:func:`block_mask`), each at a ratio drawn in its own stratum of [0.1, 0.5]
  (:func:`draw_masks`, DINOv2's ``collate_data_and_cast``); masked patches enter the student's
  backbone as a learned mask token (pretrain.models.masked), the teacher sees the global crops
  unmasked;
* the iBOT loss (:func:`ibot_loss`): the student's iBOT-head output at each masked patch against
  the teacher's (centred, sharpened) output at the same patch, averaged per image over its masked
  patches, then over all global crops (unmasked ones count as zero, as the official code weights it);
* KoLeo (:func:`koleo_loss`) on each global crop's L2-normalised class tokens (the student
  backbone's pooled output), summed over the two crops;
* ``centering: sinkhorn_knopp`` (:func:`sinkhorn_knopp`, 3 iterations over the batch of every
  rank) in place of the EMA centre, for both the class and the patch outputs;
* layer-wise lr decay and a lower lr for the patch embedding (:meth:`Objective.lr_scale`).

The loss is ``dino_loss_weight * DINO + ibot_loss_weight * iBOT + koleo_loss_weight * KoLeo``
(DINOv2's defaults 1, 1, 0.1). The mask is drawn on the host (``step_inputs``) from the model-side
random stream that the trainer seeds from (seed, rank, step, micro-step), so a resumed run draws the
same masks. The heads see the masked patches' tokens padded to the most patches the masks can hold
(:func:`masked_patch_rows`), as DINOv2's do: the same shapes every step, one compiled graph.
ViT backbones only: iBOT needs patch tokens at the patch level the mask is drawn on.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from pretrain.dist import DistEnv
from pretrain.models.heads import DINOHead
from pretrain.models.masked import MaskToken, MaskTokenInit, accept_masks, accepts_masks
from pretrain.objectives import dino, monitors
from pretrain.sections import ConfigError


# -- the pieces, as pure functions -------------------------------------------------------------------
@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, teacher_temp: float | torch.Tensor, dist: DistEnv, iterations: int = 3,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher probabilities (B x K) from ``logits`` (B x K) by Sinkhorn-Knopp over the batch of
    every rank (a collective): ``exp(logits / teacher_temp)``, then ``iterations`` times each
    prototype's column scaled to total 1/K and each sample's row to 1/B (B: samples of all ranks);
    finally scaled by B, so that each row sums to 1 and each prototype gets about B/K of the mass.
    The logits' global maximum is subtracted first (the normalisation cancels it): no overflow.
    ``valid`` (B bool): only these rows are samples; the others (padding) come out as zeros."""
    logits = logits.float()
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None], -math.inf)
    top = logits.max().reshape(1) if logits.numel() else logits.new_full((1,), -math.inf)
    dist.all_reduce(top, "max")
    q = torch.exp((logits - top) / teacher_temp)
    if valid is None:
        samples = logits.new_full((1,), float(len(logits)))
    else:  # where(): with no valid row anywhere, top is -inf and the padding's exp(nan) must not spread
        q = torch.where(valid[:, None], q, 0.0)
        samples = valid.sum().float().reshape(1)
    dist.all_reduce(samples)
    prototypes = logits.shape[1]
    # The floors only keep rows (and batches) with nothing in them at zero instead of 0 / 0.
    tiny = torch.finfo(q.dtype).tiny
    total = q.sum().reshape(1)
    q /= dist.all_reduce(total).clamp_min(tiny)
    for _ in range(iterations):
        columns = q.sum(dim=0, keepdim=True)
        q /= (dist.all_reduce(columns) * prototypes).clamp_min(tiny)
        q /= (q.sum(dim=1, keepdim=True) * samples).clamp_min(tiny)
    return q * samples


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (Sablayrolles et al. 2019, DINOv2's ``KoLeoLoss``): ``-mean_i log(||x_i - x_j(i)|| + eps)``
    over L2-normalised ``features`` (B x D), ``j(i)`` the nearest other row by inner product."""
    x = F.normalize(features.float(), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)  # below any inner product of unit vectors: a row is never its own neighbour
        nearest = dots.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()


def ibot_loss(student_logits: torch.Tensor, teacher_p: torch.Tensor, weight: torch.Tensor, images: int,
              student_temp: float) -> torch.Tensor:
    """iBOT's patch loss (DINOv2's ``iBOTPatchLoss.forward_masked``) over the masked patches of
    ``images`` images. ``student_logits`` and ``teacher_p``: M x K, a row per masked patch and rows
    of padding; ``weight``: M, each row's (:func:`masked_patch_rows`). Each patch's cross-entropy
    ``-sum_k p_t log softmax(s / student_temp)`` is weighted by 1 / (its image's masked patches),
    padding by 0; summed, and divided by ``images``."""
    cross_entropy = -torch.sum(teacher_p * F.log_softmax(student_logits.float() / student_temp, dim=-1), dim=-1)
    return (cross_entropy * weight).sum() / images


def masked_patch_rows(masks: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, weight) of ``rows`` rows (``masks``: N x L bool on the host). ``index``: the masked
    patches' positions among the N * L patches, in ``masks.nonzero()`` order, then 0 as padding (at
    least as many rows as masked patches); ``weight``: 1 / (its image's masked patches), 0 for the
    padding (iBOT's weighting, :func:`ibot_loss`). A fixed number of rows makes the same shapes
    every step: the compiled step is one graph, as DINOv2's heads run on a buffer of its upper bound."""
    positions = masks.flatten().nonzero()[:, 0]
    per_image = 1.0 / masks.sum(dim=1).clamp(min=1).float()
    rows = max(rows, len(positions))
    index = torch.zeros(rows, dtype=torch.long)
    weight = torch.zeros(rows)
    index[:len(positions)] = positions
    weight[:len(positions)] = per_image[positions // masks.shape[1]]
    return index, weight


def block_mask(height: int, width: int, count: int, rng=random, min_patches: int = 4,
               max_patches: int | None = None, min_aspect: float = 0.3) -> torch.Tensor:
    """A height x width bool mask of about ``count`` patches in rectangular blocks, drawn as DINOv2's
    (BEiT's) ``MaskingGenerator``: each block of area uniform in [min_patches, room left] and
    log-uniform aspect ratio in [min_aspect, 1 / min_aspect] at a uniform position, up to 10 tries
    per block; a block must add at least one new patch and at most the room left. Stops when
    ``count`` patches are masked or a block cannot be placed (so it may mask fewer)."""
    max_patches = count if max_patches is None else max_patches
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = torch.zeros(height, width, dtype=torch.bool)
    masked = 0
    while masked < count:
        room = min(count - masked, max_patches)
        added = 0
        for _ in range(10):
            area = rng.uniform(min_patches, room)
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= room:
                    block.fill_(True)
                    added = new
            if added:
                break
        if not added:
            break
        masked += added
    return mask


def masked_patches_bound(crops: int, patches: int, probability: float = 0.5,
                         ratio: tuple[float, float] = (0.1, 0.5)) -> int:
    """The most patches :func:`draw_masks` masks in ``crops`` crops of ``patches`` patches: each
    masked crop at most the top of its stratum (DINOv2's ``upperbound``)."""
    masked = int(crops * probability)
    bounds = torch.linspace(ratio[0], ratio[1], masked + 1).tolist()
    return sum(int(patches * bounds[i + 1]) for i in range(masked))


def draw_masks(crops: int, height: int, width: int, probability: float = 0.5,
               ratio: tuple[float, float] = (0.1, 0.5), rng=random) -> torch.Tensor:
    """crops x height x width bool masks as DINOv2's ``collate_data_and_cast`` draws them:
    ``int(crops * probability)`` crops masked, the i-th at a ratio uniform in the i-th of as many
    equal strata of ``ratio``, the others not at all, in a random order; blocks of at most half
    the grid each."""
    patches = height * width
    masked = int(crops * probability)
    bounds = torch.linspace(ratio[0], ratio[1], masked + 1).tolist()
    masks = [block_mask(height, width, int(patches * rng.uniform(bounds[i], bounds[i + 1])), rng,
                        max_patches=int(0.5 * patches)) for i in range(masked)]
    masks += [torch.zeros(height, width, dtype=torch.bool)] * (crops - masked)
    rng.shuffle(masks)
    return torch.stack(masks)


# -- the objective -----------------------------------------------------------------------------------
@dataclass
class Config(dino.Config):
    """DINO's keys with DINOv2's defaults (dinov2/configs/ssl_default_config.yaml), and DINOv2's own."""

    name: str = "dinov2"
    momentum: float = 0.992
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_crops: int = 8
    local_scale: tuple[float, float] = (0.05, 0.32)
    centering: Literal["centering", "sinkhorn_knopp"] = "centering"
    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    ibot_out_dim: int = 65536  # the iBOT head's prototypes (its other sizes are the DINO head's)
    share_head: bool = False  # one head for the class and the patch tokens (ibot_out_dim unused)
    mask_probability: float = 0.5  # share of the global crops that are masked
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # of a masked crop's patches
    # DINOv2's lr multipliers: layerwise_decay ** (depth + 1 - layer) per block (patch embedding,
    # position embedding, class and mask tokens layer 0; final norm and heads depth + 1), and
    # patch_embed_lr_mult on top for the patch embedding.
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    mask_token_init: MaskTokenInit = "normal"  # pretrain.models.masked; DINOv2's starts at zeros
    # The official per-GPU batch: KoLeo's nearest neighbours and the masks' ratio strata are taken
    # per group of this many images, as each of the paper's GPUs took them, whatever the number of
    # processes; each rank's batch must be a multiple of it. null: each rank's whole batch.
    per_gpu_batch: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.ibot_out_dim <= 0:
            raise ConfigError(f"objective.ibot_out_dim={self.ibot_out_dim!r}: must be positive")
        self.require_at_most(dino.MAX_HEAD_DIM, "ibot_out_dim")
        for key in ("dino_loss_weight", "ibot_loss_weight", "koleo_loss_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"objective.{key}={getattr(self, key)!r}: must be >= 0")
        for key in ("layerwise_decay", "patch_embed_lr_mult"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise ConfigError(f"objective.{key}={getattr(self, key)!r}: must be in (0, 1]")
        if not 0.0 <= self.mask_probability <= 1.0:
            raise ConfigError(f"objective.mask_probability={self.mask_probability!r}: must be in [0, 1]")
        low, high = self.mask_ratio
        if not 0 <= low <= high <= 1:
            raise ConfigError(f"objective.mask_ratio={[low, high]}: need 0 <= min <= max <= 1")
        if self.per_gpu_batch is not None and self.per_gpu_batch <= 0:
            raise ConfigError(f"objective.per_gpu_batch={self.per_gpu_batch!r}: must be positive (or null)")

    def validate_run(self, cfg) -> None:
        super().validate_run(cfg)
        if self.per_gpu_batch is not None and cfg.data.batch_size % self.per_gpu_batch:
            raise ConfigError(f"objective.per_gpu_batch={self.per_gpu_batch}: each rank's batch (data.batch_size="
                              f"{cfg.data.batch_size}, from data.global_batch over the processes) must be a multiple "
                              f"of it; run on data.global_batch / {self.per_gpu_batch} processes or a divisor of that")


class Objective(dino.Objective):
    def __init__(self, cfg, ctx) -> None:
        super().__init__(cfg, ctx)
        backbone = self.student["backbone"]
        if not hasattr(backbone, "num_prefix_tokens") or not accepts_masks(backbone):
            raise ConfigError(f"model.name={cfg.model.name!r}: objective.name=dinov2 needs a ViT (patch tokens at "
                              f"the patch level the mask is drawn on)")
        for network in (backbone, self.teacher.nets["backbone"]):
            accept_masks(network)  # the student's masked and both networks' unpooled tokens
        patch = backbone.patch_embed.patch_size
        self.patch_size = patch[0] if isinstance(patch, (tuple, list)) else patch
        o = cfg.objective
        self.mask_token = MaskToken(backbone.patch_embed.proj.out_channels, o.mask_token_init)
        self.register_buffer("ibot_center", torch.zeros(1, o.out_dim if o.share_head else o.ibot_out_dim))

    def head_builders(self, in_dim: int) -> dict:
        o = self.cfg.objective
        builders = super().head_builders(in_dim)
        if not o.share_head:
            builders["ibot_head"] = lambda: DINOHead(in_dim, o.ibot_out_dim, o.hidden_dim, o.bottleneck_dim,
                                                     o.head_layers, o.norm_last_layer)
        return builders

    def param_groups(self) -> list[dict]:
        """DINO's groups (weight decay or not, frozen prototypes), each split by DINOv2's lr
        multiplier (``lr_scale``, which the engine applies to the scheduled lr)."""
        names = {id(p): n for n, p in self.named_parameters()}
        out = []
        for group in super().param_groups():
            by_scale: dict[float, list] = {}
            for p in group["params"]:
                by_scale.setdefault(self.lr_scale(names[id(p)]), []).append(p)
            out += [{**group, "params": params, "lr_scale": scale} for scale, params in by_scale.items()]
        return out

    def lr_scale(self, name: str) -> float:
        """DINOv2's ``get_vit_lr_decay_rate`` and ``patch_embed_lr_mult`` for parameter ``name``."""
        o = self.cfg.objective
        depth = len(self.student["backbone"].blocks)
        layer = depth + 1
        if name.startswith("student.backbone."):
            inner = name[len("student.backbone."):]
            if inner.startswith(("patch_embed.", "pos_embed", "cls_token", "reg_token")):
                layer = 0
            elif inner.startswith("blocks."):
                layer = int(inner.split(".")[1]) + 1
        elif name.startswith("mask_token."):
            layer = 0  # DINOv2's mask token is part of its backbone
        scale = o.layerwise_decay ** (depth + 1 - layer)
        return scale * o.patch_embed_lr_mult if ".patch_embed." in name else scale

    def image_groups(self, images: int) -> list[int]:
        """This rank's ``images`` split into groups of ``objective.per_gpu_batch`` (or one group)."""
        size = self.cfg.objective.per_gpu_batch or images
        return [size] * (images // size) if images % size == 0 else [images]

    def _ibot_head(self) -> str:
        return "head" if self.cfg.objective.share_head else "ibot_head"

    def _tokens(self, backbone, images: torch.Tensor, masks: torch.Tensor | None = None):
        """(pooled features, patch tokens N x L x C) of ``backbone`` on ``images``, masked by ``masks``."""
        tokens = backbone(images, mask_token=None if masks is None else self.mask_token, mask=masks, unpooled=True)
        return backbone.forward_head(tokens, pre_logits=True), tokens[:, backbone.num_prefix_tokens:]

    def _teacher_p(self, logits: torch.Tensor, center: torch.Tensor, temp: torch.Tensor,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
        if self.cfg.objective.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp, self.ctx.dist, valid=valid)
        return F.softmax((logits.float() - center) / temp, dim=-1)

    def step_inputs(self, batch: dict, step: int) -> dict:
        """DINO's, and the masks of the global crops, drawn on the host as DINOv2's collate draws
        them, with the rows of the masked patches padded to their upper bound."""
        o = self.cfg.objective
        images, side = len(batch["global"]), batch["global"].shape[-1] // self.patch_size
        groups = self.image_groups(images)
        # Crop-major: each group's masks go to its images' first crops, then to their second crops.
        drawn = [draw_masks(2 * g, side, side, o.mask_probability, o.mask_ratio).view(2, g, side, side)
                 for g in groups]
        masks = torch.cat(drawn, dim=1).flatten(0, 1)
        bound = sum(masked_patches_bound(2 * g, side * side, o.mask_probability, o.mask_ratio) for g in groups)
        index, weight = masked_patch_rows(masks.flatten(1), bound)
        device = self.ctx.dist.device
        return {**super().step_inputs(batch, step), "masks": _to_device(masks, device),
                "patch_index": _to_device(index, device), "patch_weight": _to_device(weight, device)}

    def micro_step(self, batch: dict, teacher_temp: torch.Tensor, frozen: bool, masks: torch.Tensor,
                   patch_index: torch.Tensor, patch_weight: torch.Tensor):
        o = self.cfg.objective
        global_crops = self.global_inputs(batch)
        groups = self.image_groups(len(global_crops) // 2)
        valid = patch_weight > 0  # the masked patches' rows; the others pad them to a fixed number

        with torch.no_grad():
            teacher = self.teacher.nets["backbone"]
            teacher_cls, teacher_patches = self._tokens(teacher, global_crops)
            teacher_out = self.teacher.nets["head"](teacher_cls)
            teacher_patch_out = self.teacher.nets[self._ibot_head()](_rows(teacher_patches, patch_index))
            teacher_p = self._teacher_p(teacher_out, self.center, teacher_temp)
            teacher_patch_p = self._teacher_p(teacher_patch_out, self.ibot_center, teacher_temp, valid)

        student_cls, student_patches = self._tokens(self.student["backbone"], global_crops, masks)
        features = self.and_local_features(student_cls, batch)
        student_out = self.student["head"](features, freeze_last_layer=frozen)
        student_patch_out = self.student[self._ibot_head()](_rows(student_patches, patch_index),
                                                            freeze_last_layer=frozen)

        dino_part = dino.dino_cross_entropy(student_out, teacher_p, o.student_temp)
        ibot_part = ibot_loss(student_patch_out, teacher_patch_p, patch_weight, len(masks), o.student_temp)
        # Per global crop and per group of images, averaged over the groups (one group: DINOv2's sum).
        koleo_part = sum(koleo_loss(g) for c in student_cls.chunk(2) for g in c.split(groups)) / len(groups)
        loss = o.dino_loss_weight * dino_part + o.ibot_loss_weight * ibot_part + o.koleo_loss_weight * koleo_part

        metrics = self._monitors(student_out, teacher_out, teacher_p, features)
        with torch.no_grad():
            k = math.log(teacher_patch_p.shape[-1])
            patch_entropy = _mean_over(monitors.entropy(teacher_patch_p), valid) / k
        metrics.update(dino_loss=dino_part.detach(), ibot_loss=ibot_part.detach(), koleo_loss=koleo_part.detach(),
                       ibot_teacher_entropy=patch_entropy, masked_ratio=masks.float().mean())
        if o.centering == "centering":
            self._update_center(teacher_out)
            self._update_ibot_center(teacher_patch_out, valid)
        return loss, metrics

    @torch.no_grad()
    def _update_ibot_center(self, teacher_patch_out: torch.Tensor, valid: torch.Tensor) -> None:
        """EMA of the teacher's mean output over the masked patches (the ``valid`` rows), averaged over
        the ranks (DINOv2's ``iBOTPatchLoss.update_center``: each rank's mean, however many patches
        it masked; none: zero)."""
        mean = _mean_over(teacher_patch_out.float(), valid).reshape(self.ibot_center.shape)
        self.ctx.dist.all_reduce(mean)
        m = self.cfg.objective.center_momentum
        self.ibot_center.mul_(m).add_(mean / self.ctx.dist.world_size, alpha=1 - m)


def _rows(patches: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The rows ``index`` of the N x L x C patch tokens, as (N * L) x C."""
    return patches.flatten(0, 1).index_select(0, index)


def _mean_over(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` (M or M x K) over its ``rows`` (M bool), along the first dimension; 0 over none."""
    weight = rows.to(values.dtype).reshape(-1, *([1] * (values.ndim - 1)))
    return (values * weight).sum(dim=0) / rows.sum().clamp(min=1)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU through pinned memory, so the copy does not wait for the GPU."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
