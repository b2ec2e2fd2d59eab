"""Pieces several test files share (fixtures and run settings live in conftest.py)."""

from __future__ import annotations

import torch


class KeyOnlyView:
    """A view that decodes nothing: tests of the split, order and faults of the stream look only
    at the keys (and at a header read where the sample is damaged)."""

    decodes_itself = True

    def __call__(self, image):
        return {"image": torch.zeros(1)}
