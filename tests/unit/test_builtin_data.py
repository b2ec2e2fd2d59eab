"""The built-in patches of scikit-image's photos: shards with both splits, one class per photo, and
no validation patch that is also a training patch."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from pretrain.config import ConfigError
from pretrain.data import sources
from pretrain.data.builtin import PHOTOS, prepare
from pretrain.data.stream import ShardDataset
from pretrain.data.transforms import EvalView


def split(out, name: str) -> tuple[np.ndarray, np.ndarray]:
    dataset = ShardDataset(sources.resolve(str(out), name).urls, EvalView(32, crop_pct=1.0), 512,
                           rank=0, world_size=1, seed=0, train=False)
    batches = list(dataset)
    return (np.concatenate([b["image"].numpy() for b in batches]), np.concatenate([b["label"].numpy() for b in batches]))


def test_skimage_patches_are_written_as_labelled_shards_with_disjoint_splits(tmp_path):
    out = tmp_path / "patches"
    assert prepare("skimage_patches", out)
    assert not prepare("skimage_patches", out)  # written once
    assert sources.resolve(str(out), "train").classes == list(PHOTOS)
    train_images, train_labels = split(out, "train")
    val_images, val_labels = split(out, "val")
    assert train_images.shape[1:] == (3, 32, 32) and len(train_images) + len(val_images) == 121 * len(PHOTOS)
    assert len(val_images) == round(0.2 * 121 * len(PHOTOS))
    # Every photo is a class in both splits (a probe has 10 classes to find in each).
    assert set(train_labels) == set(val_labels) == set(range(len(PHOTOS)))
    # Grid patches do not overlap: no validation patch equals a training patch.
    seen = {image.tobytes() for image in train_images}
    flat = [i for i, image in enumerate(val_images) if image.std() > 2]  # plain sky or background may repeat
    assert len(flat) > 0.8 * len(val_images) and not any(val_images[i].tobytes() in seen for i in flat)
    # Colour photos stay in colour, grey ones are grey on every channel.
    colour = [PHOTOS.index(name) for name in ("astronaut", "coffee")]
    grey = [PHOTOS.index(name) for name in ("camera", "grass")]
    spread = lambda label: np.abs(np.diff(train_images[train_labels == label].astype(int), axis=1)).mean()
    assert all(spread(label) > 5 for label in colour) and all(spread(label) == 0 for label in grey)


def test_skimage_patches_name_the_missing_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)  # import skimage now raises ImportError
    with pytest.raises(ConfigError, match=r"data.prepare=skimage_patches.*scikit-image"):
        prepare("skimage_patches", tmp_path / "patches")
    assert not (tmp_path / "patches").exists()
