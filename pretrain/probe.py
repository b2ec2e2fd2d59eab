"""A quick linear probe: logistic regression on a frozen backbone's features (the demo's and the
tests' measure of what self-supervised pre-training learned; finetune.linear is the full stage)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from pretrain.data import sources
from pretrain.data.stream import ShardDataset
from pretrain.data.transforms import EvalView
from pretrain.features import POOLED, FeatureExtractor, extract


def features(model: nn.Module, source: str, split: str, image_size: int, mean, std,
             batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(pooled features, labels) of every sample of one split, in order."""
    found = extract(FeatureExtractor(model), _split(source, split, image_size, batch_size), mean, std)
    return found.variants[POOLED].numpy(), found.labels.numpy()


def _split(source: str, split: str, image_size: int, batch_size: int) -> ShardDataset:
    """Every sample of one split once, in order, at ``image_size`` (no crop)."""
    return ShardDataset(sources.resolve(source, split).urls, EvalView(image_size, crop_pct=1.0), batch_size,
                        rank=0, world_size=1, seed=0, train=False)


@torch.no_grad()
def pixels(source: str, split: str, image_size: int, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(flattened raw pixels, labels) of every sample of one split at ``image_size``, in order."""
    batches = list(_split(source, split, image_size, batch_size))
    return (np.concatenate([b["image"].flatten(1).float().numpy() for b in batches]),
            np.concatenate([b["label"].numpy() for b in batches]))


def logistic_regression_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                                 y_val: np.ndarray) -> float:
    """Top-1 on ``x_val`` of a logistic regression fit on standardized ``x_train``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    classifier = LogisticRegression(max_iter=2000).fit(scaler.transform(x_train), y_train)
    return float((classifier.predict(scaler.transform(x_val)) == y_val).mean())


def probe_accuracy(model: nn.Module, source: str, image_size: int, mean, std) -> float:
    """Top-1 on the ``val`` split of a logistic regression fit on the ``train`` split's features."""
    return logistic_regression_accuracy(*features(model, source, "train", image_size, mean, std),
                                        *features(model, source, "val", image_size, mean, std))


def raw_pixel_accuracy(source: str, image_size: int, val_source: str | None = None) -> float:
    """The same probe on the raw pixels: what the data gives a linear classifier with no backbone
    (the reference a pre-trained backbone's probe is read against). ``val_source``: where the
    ``val`` split is, if not in ``source``."""
    return logistic_regression_accuracy(*pixels(source, "train", image_size),
                                        *pixels(val_source or source, "val", image_size))
