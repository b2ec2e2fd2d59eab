"""Decoding and the fast views: every image mode to RGB, reduced JPEG decoding, crops as timm cuts them."""

from __future__ import annotations

import io
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.data.decode import EncodedImage, decode_pixels, load_rgb
from pretrain.data.stream import ShardDataset
from pretrain.data.transforms import EvalView, SupervisedTrainView, crop_resize
from tests.unit.data_samples import bad_samples, image_bytes


@pytest.fixture(scope="module")
def photo() -> bytes:
    from skimage import data

    return image_bytes(data.astronaut(), quality=90)  # 512x512, a real photo


class DecodedView:
    """A view that takes decoded RGB images (the default for views that do not decode themselves)."""

    def __call__(self, image):
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        return {"image": torch.from_numpy(np.array(image.resize((8, 8))))}


@pytest.mark.parametrize("view", [EvalView(8, 1.0), DecodedView()], ids=["decodes_itself", "decoded"])
def test_every_mode_becomes_rgb_and_every_broken_file_is_counted(view):
    dataset = ShardDataset([], view, 1, rank=0, world_size=1, seed=0, train=False)
    for name, (sample, reason) in bad_samples().items():
        item = dataset._prepare({"__key__": name, **sample}, seed=0)
        if reason is None:
            assert item is not None and item["image"].dtype == torch.uint8 and item["image"].numel() == 192, name
        else:
            assert item is None, name
    assert dataset.counters == Counter(r for _, r in bad_samples().values() if r)
    assert dataset.seen == len(bad_samples())


def test_16_bit_images_are_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 256).astype(np.uint16)[None].repeat(4, 0)
    rgb = np.asarray(load_rgb(Image.open(io.BytesIO(image_bytes(Image.fromarray(ramp), "PNG")))))
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255 and 120 <= rgb[0, 128, 0] <= 135


def test_reduced_decoding_matches_full_decoding(photo):
    box, size = (40, 60, 500, 480), (112, 100)  # shrunk 4x: decoded at 1/4 scale
    fast = crop_resize(EncodedImage.open(photo), box, size, "bilinear")
    full = torch.from_numpy(np.array(Image.open(io.BytesIO(photo)).convert("RGB").resize(size, Image.BILINEAR, box=box)))
    assert fast.shape == (3, 100, 112) and fast.dtype == torch.uint8
    assert (fast.permute(1, 2, 0).float() - full.float()).abs().mean() < 4.0
    assert decode_pixels(EncodedImage.open(photo), (128, 128)).shape == (128, 128, 3)


def test_train_crop_is_timms_crop(photo):
    from timm.data.transforms import RandomResizedCropAndInterpolation

    ours = SupervisedTrainView(64, (0.08, 1.0), (3 / 4, 4 / 3), 0.0, None, 0.0, "bicubic", (0.5,) * 3)
    timm_crop = RandomResizedCropAndInterpolation(64, interpolation="bicubic")
    decoded = Image.open(io.BytesIO(photo)).convert("RGB")
    for seed in range(5):
        random.seed(seed)
        reference = torch.from_numpy(np.array(timm_crop(decoded))).permute(2, 0, 1).float()
        random.seed(seed)
        same_pixels = ours(decoded)["image"].float()  # the same crop box, resized by torch instead of PIL
        assert (same_pixels - reference).abs().mean() < 0.5, seed
        random.seed(seed)
        reduced = ours(EncodedImage.open(photo))["image"].float()  # JPEG decoded at 1/2 or 1/4 scale
        assert (reduced - reference).abs().mean() < 10.0, seed


def test_randaugment_at_full_magnitude_posterizes_to_black_instead_of_failing(photo):
    """timm's increasing posterize keeps 0 bits at magnitude 10 (which m9-mstd0.5 reaches); Pillow 13
    rejects 0 bits, Pillow < 13 returned a black image: the view must return that on every Pillow."""
    view = SupervisedTrainView(16, (0.5, 1.0), (3 / 4, 4 / 3), 0.0, "rand-m10-n1-inc1", 0.0, "bicubic", (0.5,) * 3)
    decoded = Image.open(io.BytesIO(photo)).convert("RGB")
    random.seed(0)
    black = sum(int(view(decoded)["image"].max()) == 0 for _ in range(200))
    assert black > 0  # n1 picks posterize in about 1 of 15 calls, applied in half of those


def test_eval_view_is_resize_then_centre_crop(photo):
    from timm.data import create_transform

    reference = create_transform(56, is_training=False, crop_pct=0.875, interpolation="bicubic", use_prefetcher=True)
    expected = torch.as_tensor(np.asarray(reference(Image.open(io.BytesIO(photo)).convert("RGB"))))
    got = EvalView(56, 0.875)(EncodedImage.open(photo))["image"]
    assert got.shape == expected.shape == (3, 56, 56)
    assert (got.float() - expected.float()).abs().mean() < 4.0
    placeholder = EvalView(56, 0.875)(Image.new("RGB", (56, 56)))["image"]  # a decoded image works too
    assert placeholder.shape == (3, 56, 56) and placeholder.max() == 0
