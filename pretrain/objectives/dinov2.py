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
  rank) in place of the EMA centre, for both the class and the patch outputs.

The loss is ``dino_loss_weight * DINO + ibot_loss_weight * iBOT + koleo_loss_weight * KoLeo``
(DINOv2's defaults 1, 1, 0.1). The mask is drawn in ``forward`` from the model-side random stream
that the trainer seeds from (seed, rank, step, micro-step), so a resumed run draws the same masks.
ViT backbones only: iBOT needs patch tokens at the patch level the mask is drawn on.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from pretrain.config import ConfigError
from pretrain.dist import DistEnv
from pretrain.models.heads import DINOHead
from pretrain.models.masked import MaskToken, unpooled
from pretrain.objectives import dino


# -- the pieces, as pure functions -------------------------------------------------------------------
@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, teacher_temp: float, dist: DistEnv, iterations: int = 3) -> torch.Tensor:
    """Teacher probabilities (B x K) from ``logits`` (B x K) by Sinkhorn-Knopp over the batch of
    every rank (a collective): ``exp(logits / teacher_temp)``, then ``iterations`` times each
    prototype's column scaled to total 1/K and each sample's row to 1/B (B: samples of all ranks);
    finally scaled by B, so that each row sums to 1 and each prototype gets about B/K of the mass.
    The logits' global maximum is subtracted first (the normalisation cancels it): no overflow."""
    logits = logits.float()
    top = logits.max().reshape(1) if logits.numel() else logits.new_full((1,), -math.inf)
    dist.all_reduce(top, "max")
    q = torch.exp((logits - top) / teacher_temp)
    samples = logits.new_full((1,), float(len(logits)))
    dist.all_reduce(samples)
    prototypes = logits.shape[1]
    total = q.sum().reshape(1)
    q /= dist.all_reduce(total)
    for _ in range(iterations):
        columns = q.sum(dim=0, keepdim=True)
        q /= dist.all_reduce(columns) * prototypes
        q /= q.sum(dim=1, keepdim=True) * samples
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


def ibot_loss(student_logits: torch.Tensor, teacher_p: torch.Tensor, masks: torch.Tensor,
              student_temp: float) -> torch.Tensor:
    """iBOT's patch loss (DINOv2's ``iBOTPatchLoss.forward_masked``). ``masks``: N x L bool, the
    masked patches of N images; ``student_logits`` and ``teacher_p``: M x K, one row per masked
    patch in ``masks.nonzero()`` order. Each patch's cross-entropy ``-sum_k p_t log softmax(s /
    student_temp)`` is weighted by 1 / (its image's masked patches), summed, and divided by N."""
    cross_entropy = -torch.sum(teacher_p * F.log_softmax(student_logits.float() / student_temp, dim=-1), dim=-1)
    weight = (1.0 / masks.sum(dim=-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
    return (cross_entropy * weight).sum() / masks.shape[0]


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
