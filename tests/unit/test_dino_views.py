"""Multi-crop views on the CPU and photometric augmentation on the device."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from pretrain.data.transforms import random_resized_box
from pretrain.data.views import MultiCropView, Photometric, _shift_hue

OFF = dict(jitter=0.0, grayscale=0.0, blur=0.0, solarize=0.0)


def test_multi_crop_shapes():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    out = MultiCropView(32, (0.4, 1.0), 16, (0.05, 0.4), 5)(image)
    assert out["global"].shape == (2, 3, 32, 32) and out["local"].shape == (5, 3, 16, 16)
    assert out["global"].dtype == torch.uint8
    assert "local" not in MultiCropView(32, (0.4, 1.0), 16, (0.05, 0.4), 0)(image)


@pytest.mark.parametrize("scale", [(0.05, 0.4), (0.4, 1.0)])
def test_crop_boxes_cover_the_requested_area(scale):
    random.seed(1)
    for _ in range(200):
        left, top, right, bottom = random_resized_box(500, 375, scale)
        assert 0 <= left < right <= 500 and 0 <= top < bottom <= 375
        area = (right - left) * (bottom - top) / (500 * 375)
        assert scale[0] * 0.95 <= area <= scale[1] * 1.05


def random_images(n=6, size=12, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_nothing_on_means_only_scaling():
    images = random_images()
    assert torch.equal(Photometric(**OFF)(images), images.float() / 255)


def test_grayscale_and_solarize():
    images = random_images()
    gray = Photometric(**{**OFF, "grayscale": 1.0})(images)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    expected = TF.rgb_to_grayscale(images.float() / 255)
    assert torch.allclose(gray[:, :1], expected, atol=1e-5)
    solar = Photometric(**{**OFF, "solarize": 1.0})(images)
    assert torch.allclose(solar, TF.solarize(images, 128).float() / 255)


def test_hue_rotation_matches_torchvision():
    images = random_images(seed=3).float() / 255
    for shift in (-0.1, 0.05, 0.5):
        ours = _shift_hue(images, torch.full((len(images), 1, 1, 1), shift))
        theirs = TF.adjust_hue(images, shift)
        assert torch.allclose(ours, theirs, atol=2e-3), shift


def test_jitter_and_blur_change_each_image_differently():
    torch.manual_seed(0)
    images = random_images(n=8, size=16)
    out = Photometric(jitter=1.0, grayscale=0.0, blur=1.0)(images)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    changes = (out - images.float() / 255).abs().mean(dim=(1, 2, 3))
    assert (changes > 1e-3).all() and changes.std() > 1e-4
    flat = torch.full((2, 3, 16, 16), 77, dtype=torch.uint8)  # blur keeps a flat image flat
    assert torch.allclose(Photometric(**{**OFF, "blur": 1.0})(flat), flat.float() / 255, atol=1e-6)
