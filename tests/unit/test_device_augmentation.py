"""The supervised recipe's device-side augmentations (Mixup/CutMix, random erasing) and the
self-supervised photometric one: what timm's computes, and traced whole by torch.compile with no
graph break (backend "eager": dynamo's capture alone, which is where breaks happen)."""

from __future__ import annotations

import pytest
import torch

from pretrain.data.erasing import RandomErasing
from pretrain.data.mixing import MixupCutmix
from pretrain.data.views import Photometric


def distinct_images(n: int = 8, size: int = 16) -> torch.Tensor:
    """Images whose every pixel differs from every other image's: where a mixed pixel came from shows."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) + torch.arange(n).view(n, 1, 1, 1)


LABELS = torch.arange(8)


def test_mixup_blends_each_image_with_its_mirror_by_its_targets_lambda():
    torch.manual_seed(0)
    images = distinct_images()
    mixed, targets = MixupCutmix(0.8, 0.0, 1.0, 0.5, "elem", 0.0, 8)(images, LABELS)
    lam = targets[LABELS, LABELS]
    torch.testing.assert_close(targets[LABELS, LABELS.flip(0)], 1 - lam)
    torch.testing.assert_close(mixed, images * lam.view(8, 1, 1, 1) + images.flip(0) * (1 - lam.view(8, 1, 1, 1)))
    assert lam.unique().numel() == 8  # elem mode: a lambda per image


def test_cutmix_pastes_one_box_per_pair_and_its_area_is_the_targets_share():
    torch.manual_seed(1)
    images = distinct_images()
    mixed, targets = MixupCutmix(0.0, 1.0, 1.0, 0.5, "pair", 0.0, 8)(images, LABELS)
    pasted = (mixed == images.flip(0)).all(dim=1)  # N x H x W
    assert ((mixed == images).all(dim=1) | pasted).all()  # every pixel its own or its mirror's
    torch.testing.assert_close(pasted.float().mean(dim=(1, 2)), 1 - targets[LABELS, LABELS])
    assert torch.equal(pasted, pasted.flip(0))  # a pair shares its box
    for box in pasted:  # a rectangle: the rows and columns it touches, crossed
        rows, columns = box.any(dim=1), box.any(dim=0)
        assert torch.equal(box, rows[:, None] & columns[None, :])
    assert pasted.any()


def test_unmixed_batches_keep_their_images_and_smoothed_labels():
    images = distinct_images()
    mixed, targets = MixupCutmix(0.8, 1.0, 0.0, 0.5, "batch", 0.1, 10)(images, LABELS)
    assert torch.equal(mixed, images)
    torch.testing.assert_close(targets, torch.nn.functional.one_hot(LABELS, 10) * 0.9 + 0.01)


def test_mixing_draws_beta_lambdas_and_switches_to_cutmix_at_its_rate():
    torch.manual_seed(2)
    mix = MixupCutmix(0.8, 1.0, 1.0, 0.3, "elem", 0.0, 4000)
    lam, cutmix = mix._draw(4000, "cpu")
    assert abs(cutmix.float().mean() - 0.3) < 0.03
    mixup_lam = lam[~cutmix]  # Beta(0.8, 0.8): mean 1/2, variance 1 / (4 (2 alpha + 1))
    assert abs(mixup_lam.mean() - 0.5) < 0.02 and abs(mixup_lam.var() - 1 / (4 * 2.6)) < 0.01
    assert abs(lam[cutmix].var() - 1 / 12) < 0.015  # Beta(1, 1): uniform


@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
def test_erasing_fills_one_box_per_image_within_the_area_and_aspect_limits(mode):
    torch.manual_seed(3)
    images = torch.randn(64, 3, 24, 24) + 10.0  # far from the fill's values
    erased = RandomErasing(1.0, mode)(images)
    box = (erased != images).all(dim=1)
    assert torch.equal((erased != images).any(dim=1), box)  # all channels together
    for image, inside in zip(erased, box):
        rows, columns = inside.any(dim=1), inside.any(dim=0)
        assert torch.equal(inside, rows[:, None] & columns[None, :])  # one rectangle
        height, width = int(rows.sum()), int(columns.sum())
        assert 0.02 * 0.8 <= height * width / 24 ** 2 <= 1 / 3 * 1.2
        assert 0.3 * 0.7 <= height / width <= 1 / 0.3 / 0.7
        fill = image[:, inside]
        if mode == "const":
            assert torch.equal(fill, torch.zeros_like(fill))
        elif mode == "rand":  # one colour per channel
            assert torch.equal(fill, fill[:, :1].expand_as(fill))
        elif fill.shape[1] > 1:
            assert fill.std() > 0.3
    kept = RandomErasing(0.0, mode)(images)
    assert torch.equal(kept, images)


def test_erasing_skips_about_one_minus_its_probability():
    torch.manual_seed(4)
    images = torch.randn(2000, 1, 8, 8) + 10.0
    erased = (RandomErasing(0.25)(images) != images).flatten(1).any(dim=1)
    assert abs(erased.float().mean() - 0.25) < 0.03


@pytest.mark.parametrize("augment", [
    lambda x: MixupCutmix(0.8, 1.0, 1.0, 0.5, "batch", 0.1, 8)(x, LABELS),
    lambda x: MixupCutmix(0.8, 1.0, 1.0, 0.5, "pair", 0.1, 8)(x, LABELS),
    lambda x: RandomErasing(0.5, "pixel")(x),
    lambda x: Photometric(jitter=1.0, blur=0.5, solarize=0.5)((x * 20).to(torch.uint8)),
], ids=["mixup-batch", "mixup-pair", "erasing", "photometric"])
def test_augmentations_trace_as_one_graph_and_draw_as_eager(augment):
    torch._dynamo.reset()
    compiled = torch.compile(augment, backend="eager", fullgraph=True, dynamic=False)  # a graph break raises
    images = distinct_images()
    torch.manual_seed(5)
    expected = augment(images)
    torch.manual_seed(5)
    torch.testing.assert_close(compiled(images), expected, rtol=0, atol=0)
