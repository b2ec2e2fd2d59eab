"""The view stage: the objective's view (:mod:`pretrain.data.transforms`, :mod:`pretrain.data.views`)
of one decoded sample, its random draws a function of the sample's place in the stream.

Views draw from the global RNGs; seeding them per sample from (seed, epoch, rank, worker role,
position) makes a resumed stream produce the same crops as an uninterrupted one.
"""

from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch
from PIL import Image

from pretrain.data.deal import seed_of
from pretrain.data.decode import DECODE_ERRORS, BadSample, EncodedImage


def sample_seed(seed: int, epoch: int, rank: int, role: int, position: int) -> int:
    """The seed of the views of the sample at ``position`` of a worker's (shuffled) epoch."""
    return seed_of(seed, epoch, rank, role, position)


def seed_rngs(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it queues work for every accelerator


class SeededView:
    """``view`` (image -> dict of uint8 tensors), seeded per sample.

    ``decodes_itself``: the view takes an :class:`EncodedImage` and decodes only what its crop
    needs; a file that fails there is a :class:`BadSample` (``undecodable``) like one that fails in
    the decode stage.
    """

    def __init__(self, view: Callable) -> None:
        self.view = view
        self.decodes_itself = bool(getattr(view, "decodes_itself", False))

    def __call__(self, image: Image.Image | EncodedImage, key: str, seed: int) -> dict:
        seed_rngs(seed)
        try:
            return self.view(image)
        except DECODE_ERRORS as e:
            raise BadSample("undecodable", f"{key}: {e}") from None
