"""DINOv2's pieces against their formulas on known tensors: Sinkhorn-Knopp (over 2 processes in
tests/integration/test_dinov2.py), KoLeo, the iBOT patch loss and the block-wise masks; the
objective's forward."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from tests.conftest import TINY_SWIN
from tests.helpers import TINY_DINOV2, tiny_config, tiny_objective

from pretrain.config import ConfigError
from pretrain.dist import DistEnv
from pretrain.objectives.dinov2 import (block_mask, draw_masks, ibot_loss, koleo_loss, masked_patch_rows,
                                       masked_patches_bound, sinkhorn_knopp)


def reference_sinkhorn(logits, temp, iterations):
    """Alternating normalisation in float64, written out: P = exp(logits / temp) / total; each
    prototype's column to 1/K, each sample's row to 1/B, ``iterations`` times; then B * P."""
    p = np.exp(np.asarray(logits, dtype=np.float64) / temp)
    p /= p.sum()
    b, k = p.shape
    for _ in range(iterations):
        for j in range(k):
            p[:, j] /= p[:, j].sum() * k
        for i in range(b):
            p[i, :] /= p[i, :].sum() * b
    return b * p


def test_sinkhorn_knopp_equals_its_formula_and_rows_and_columns_sum_as_they_must():
    torch.manual_seed(0)
    logits = torch.randn(12, 5) * 0.5
    q = sinkhorn_knopp(logits, 0.1, DistEnv(), iterations=3)
    np.testing.assert_allclose(q.numpy(), reference_sinkhorn(logits, 0.1, 3), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(12))  # each sample: a distribution
    # Each prototype gets B / K of the mass, to the precision the iterations reach: 3 of them
    # take it far closer than the softmax is; many converge to it.
    columns = q.sum(dim=0)
    assert (columns - 12 / 5).abs().max() < 0.5 * (torch.softmax(logits / 0.1, 1).sum(0) - 12 / 5).abs().max()
    converged = sinkhorn_knopp(logits, 0.1, DistEnv(), iterations=200).sum(dim=0)
    torch.testing.assert_close(converged, torch.full((5,), 12 / 5))


def test_sinkhorn_knopp_takes_large_logits_without_overflow():
    logits = torch.tensor([[1000.0, 999.0], [999.0, 1000.0]])
    q = sinkhorn_knopp(logits, 0.5, DistEnv())
    np.testing.assert_allclose(q.numpy(), reference_sinkhorn(logits - 1000.0, 0.5, 3), rtol=1e-6)


def test_koleo_equals_its_formula():
    # Four unit vectors at the corners of a square: every nearest neighbour is sqrt(2) away.
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]) * 3.0
    assert koleo_loss(square).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    torch.manual_seed(2)
    x = torch.randn(9, 4, dtype=torch.float64)
    unit = x / x.norm(dim=1, keepdim=True)
    expected = 0.0
    for i in range(9):
        j = max((k for k in range(9) if k != i), key=lambda k: float(unit[i] @ unit[k]))
        expected -= math.log(float((unit[i] - unit[j] + 1e-8).norm()) + 1e-8) / 9
    assert koleo_loss(x).item() == pytest.approx(expected, rel=1e-5)


def test_koleo_pushes_the_nearest_neighbours_apart():
    x = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0]], requires_grad=True)
    koleo_loss(x).backward()
    step = x.detach() - 0.1 * x.grad
    assert koleo_loss(step) < koleo_loss(x.detach())


def test_ibot_loss_equals_its_formula_and_padding_counts_for_nothing():
    torch.manual_seed(3)
    masks = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)  # 3 images, 4 patches
    index, weight = masked_patch_rows(masks, 6)  # 4 masked patches, 2 rows of padding
    assert index.tolist() == [0, 2, 3, 9, 0, 0] and weight.tolist() == pytest.approx([1 / 3] * 3 + [1, 0, 0])
    student = torch.randn(6, 5)  # one row per masked patch, image-major, then the padding's
    teacher_p = torch.softmax(torch.randn(6, 5), dim=1)
    per_image, row = [], 0
    for image in masks:
        ce = []
        for _ in range(int(image.sum())):
            ce.append(-(teacher_p[row] * torch.log_softmax(student[row] / 0.1, 0)).sum())
            row += 1
        per_image.append(torch.stack(ce).mean() if ce else torch.tensor(0.0))
    expected = torch.stack(per_image).sum() / 3  # the unmasked image counts, as zero
    torch.testing.assert_close(ibot_loss(student, teacher_p, weight, 3, 0.1), expected)
    # More masked patches than rows asked for: every one still gets a row.
    assert len(masked_patch_rows(masks, 2)[0]) == 4


def test_sinkhorn_knopp_leaves_padding_rows_out():
    torch.manual_seed(4)
    logits = torch.randn(9, 5) * 0.5
    valid = torch.tensor([True] * 6 + [False] * 3)
    padded = sinkhorn_knopp(torch.cat([logits[:6], logits[6:] + 50.0]), 0.1, DistEnv(), valid=valid)
    torch.testing.assert_close(padded[:6], sinkhorn_knopp(logits[:6], 0.1, DistEnv()))
    assert torch.equal(padded[6:], torch.zeros(3, 5))
    nothing = sinkhorn_knopp(logits, 0.1, DistEnv(), valid=torch.zeros(9, dtype=torch.bool))
    assert torch.equal(nothing, torch.zeros(9, 5))  # no masked patch anywhere: zeros, not NaN


def test_masked_patch_bound_holds_every_draw():
    rng = random.Random(5)
    bound = masked_patches_bound(8, 64, 0.5, (0.1, 0.5))
    assert bound == sum(int(64 * r) for r in (0.2, 0.3, 0.4, 0.5))
    counts = [int(draw_masks(8, 8, 8, 0.5, (0.1, 0.5), rng).sum()) for _ in range(50)]
    assert max(counts) <= bound and max(counts) > 0.8 * bound


def test_block_masks_mask_about_the_count_in_blocks():
    rng = random.Random(0)
    counts, neighboured = [], []
    for count in (10, 40, 80):
        for _ in range(20):
            mask = block_mask(14, 14, count, rng, max_patches=98)
            counts.append(int(mask.sum()) / count)
            padded = torch.nn.functional.pad(mask.float()[None, None], (1, 1, 1, 1))[0, 0]
            neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
            neighboured.append(float((neighbours[mask] > 0).float().mean()))
    assert max(counts) <= 1.0 and np.mean(counts) > 0.8, counts
    # Blocks, not scattered patches: nearly every masked patch has a masked neighbour (about a
    # quarter of them would at this density if the patches were drawn one by one).
    assert np.mean(neighboured) > 0.9, neighboured


def test_half_the_crops_are_masked_at_ratios_in_their_strata():
    rng = random.Random(1)
    masks = draw_masks(8, 16, 16, 0.5, (0.1, 0.5), rng)
    assert masks.shape == (8, 16, 16) and masks.dtype == torch.bool
    fractions = sorted(masks.flatten(1).float().mean(1).tolist())
    assert fractions[:4] == [0.0] * 4
    # The i-th masked crop draws its ratio in [0.1 + 0.1 i, 0.2 + 0.1 i]; the blocks may fall short.
    for i, fraction in enumerate(fractions[4:]):
        assert 0 < fraction <= 0.2 + 0.1 * i + 1e-6, fractions
    assert sum(fractions) > 0.8 * (0.15 + 0.25 + 0.35 + 0.45)
    assert not torch.equal(masks, draw_masks(8, 16, 16, 0.5, (0.1, 0.5), rng))


def _images(*shape, seed):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


BATCH = {"global": _images(4, 2, 3, 32, 32, seed=0), "local": _images(4, 2, 3, 16, 16, seed=1)}


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_forward_weighs_dino_ibot_and_koleo_and_trains_the_mask_token(tmp_path, centering):
    torch.manual_seed(0)
    random.seed(0)
    objective = tiny_objective(tiny_config(tmp_path, *TINY_DINOV2, f"objective.centering={centering}"))
    loss, metrics = objective(BATCH, step=0)
    assert 0 < metrics["masked_ratio"] < 0.5
    # DINOv2's default weights: 1, 1 and 0.1.
    torch.testing.assert_close(loss.detach(), metrics["dino_loss"] + metrics["ibot_loss"] + 0.1 * metrics["koleo_loss"])
    assert metrics["ibot_loss"] > 0 and 0 < metrics["ibot_teacher_entropy"] <= 1
    # The EMA centres move only when centring by them; Sinkhorn-Knopp leaves them at zero.
    moved = centering == "centering"
    assert (objective.center.abs().sum() > 0) == moved and (objective.ibot_center.abs().sum() > 0) == moved
    loss.backward()
    assert objective.mask_token.token.grad.abs().sum() > 0  # masked patches enter the student as the token
    assert objective.student["ibot_head"].last_layer.weight_v.grad.abs().sum() > 0
    assert all(p.grad is None for p in objective.teacher.parameters())
    state = objective.state_dict()
    assert {"center", "ibot_center", "mask_token.token", "teacher.master"} <= set(state)
    assert any(k.startswith("student.ibot_head.") for k in state)


def test_the_teacher_sees_unmasked_crops_and_share_head_keeps_one_head(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(tmp_path, *TINY_DINOV2, "objective.share_head=true", "objective.jitter=0",
                      "objective.grayscale=0", "objective.blur=[0, 0, 0]", "objective.solarize=0")
    objective = tiny_objective(cfg)
    assert "ibot_head" not in objective.student and "ibot_head" not in objective.teacher.nets
    seen = []
    objective.teacher.nets["head"].register_forward_hook(lambda _m, _i, out: seen.append(out))
    random.seed(0)
    objective(BATCH, step=0)
    crops = torch.cat([objective._inputs(BATCH["global"][:, i], objective.photometric[i]) for i in range(2)])
    with torch.no_grad():  # the teacher's class-token output, from its plain (unmasked) forward
        unmasked = objective.teacher.nets["head"](objective.teacher.nets["backbone"](crops))
    torch.testing.assert_close(seen[0], unmasked[:len(seen[0])])
    assert len(seen[0]) == len(crops)
    masked_crops = torch.cat([crops[:1] * 0, crops[1:]])  # a crop changed: the outputs must differ
    with torch.no_grad():
        changed = objective.teacher.nets["head"](objective.teacher.nets["backbone"](masked_crops))
    assert not torch.allclose(seen[0], changed)


def test_dinov2_needs_a_vit(tmp_path):
    with pytest.raises(ConfigError, match="needs a ViT"):
        tiny_objective(tiny_config(tmp_path, *TINY_DINOV2, *TINY_SWIN, "model.kwargs.dynamic_img_size=false",
                                   "objective.local_crops=0"))


def test_layerwise_lr_decay_and_patch_embedding_multiplier_as_dinov2(tmp_path):
    objective = tiny_objective(tiny_config(tmp_path, *TINY_DINOV2, "objective.freeze_last_layer_epochs=1"))
    # The tiny ViT has 2 blocks: layers 0 (embeddings, tokens), 1, 2 (blocks), 3 (final norm, heads).
    expected = {"student.backbone.cls_token": 0.9 ** 3, "student.backbone.pos_embed": 0.9 ** 3,
                "student.backbone.patch_embed.proj.weight": 0.9 ** 3 * 0.2, "mask_token.token": 0.9 ** 3,
                "student.backbone.blocks.0.attn.qkv.weight": 0.9 ** 2, "student.backbone.blocks.1.mlp.fc2.bias": 0.9,
                "student.backbone.norm.weight": 1.0, "student.head.mlp.0.weight": 1.0,
                "student.ibot_head.last_layer.weight_v": 1.0}
    names = {id(p): n for n, p in objective.named_parameters()}
    groups = objective.param_groups()
    scales = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert {n: scales[n] for n in expected} == pytest.approx(expected)
    assert len(scales) == sum(p.requires_grad for p in objective.parameters())  # each parameter once
    # DINO's split survives: both heads' prototypes frozen for the first epoch, decay or not per parameter.
    frozen = {names[id(p)] for g in groups if g.get("freeze_steps") for p in g["params"]}
    assert frozen == {"student.head.last_layer.weight_v", "student.ibot_head.last_layer.weight_v"}
    assert all(not g["apply_weight_decay"] for g in groups for p in g["params"] if p.ndim == 1)


def test_dinov2_freeze_by_zero_lr_lets_gradients_reach_the_prototypes(tmp_path):
    """freeze_last_layer_by=zero_lr (DINOv2): the prototypes get gradients in the frozen steps and
    their groups carry zero_lr_steps (the engine's lr 0) instead of freeze_steps; DINOv2's mask
    token starts at zeros and the prototypes' norm trains with norm_last_layer=false."""
    torch.manual_seed(0)
    random.seed(0)
    cfg = tiny_config(tmp_path, *TINY_DINOV2, "objective.freeze_last_layer_steps=3",
                      "objective.freeze_last_layer_by=zero_lr", "objective.mask_token_init=zeros",
                      "objective.norm_last_layer=false")
    objective = tiny_objective(cfg)
    assert objective.freeze_last_layer_steps == 3 and torch.all(objective.mask_token.token == 0)
    assert objective.student["head"].last_layer.weight_g.requires_grad
    names = {id(p): n for n, p in objective.named_parameters()}
    groups = objective.param_groups()
    zero_lr = {names[id(p)] for g in groups if g.get("zero_lr_steps") == 3 for p in g["params"]}
    assert "student.head.last_layer.weight_v" in zero_lr and not any(g.get("freeze_steps") for g in groups)
    loss, _ = objective(BATCH, step=0)
    loss.backward()
    assert objective.student["head"].last_layer.weight_v.grad.abs().sum() > 0


def test_per_gpu_batch_takes_koleo_per_group_of_images(tmp_path):
    """KoLeo per group of per_gpu_batch images, averaged over the groups (one GPU's loss each)."""
    torch.manual_seed(0)
    cfg = tiny_config(tmp_path, *TINY_DINOV2, "objective.per_gpu_batch=2")
    objective = tiny_objective(cfg)
    assert objective.image_groups(4) == [2, 2]
    seen = []
    objective.student["backbone"].register_forward_hook(lambda _m, _i, out: seen.append(out))
    random.seed(0)
    _, metrics = objective(BATCH, step=0)
    cls = objective.student["backbone"].forward_head(seen[0], pre_logits=True) if seen[0].ndim == 3 else seen[0]
    crops = cls[:8].chunk(2)
    expected = sum(koleo_loss(g) for c in crops for g in c.split(2)) / 2
    torch.testing.assert_close(metrics["koleo_loss"], expected.detach())
    assert not torch.allclose(expected, sum(koleo_loss(c) for c in crops))  # the grouping changes it
    with pytest.raises(ConfigError, match="objective.per_gpu_batch"):
        tiny_config(tmp_path, *TINY_DINOV2, "objective.per_gpu_batch=3")
