"""MoBY: the loss against the paper's formula, the key queues, the two views, one forward."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.helpers import TINY_MOBY, tiny_config, tiny_objective
from pretrain.config import ConfigError
from pretrain.data.views import TwoView
from pretrain.objectives.moby import moby_loss


def paper_infonce(q, k, queue, tau):
    """Xie et al. 2021, eq. (1): -log exp(q.k+/tau) / (exp(q.k+/tau) + sum_i exp(q.k_i/tau)), per sample."""
    q, k, queue = (np.asarray(a, dtype=np.float64) for a in (q, k, queue))
    losses = []
    for i in range(len(q)):
        positive = math.exp(q[i] @ k[i] / tau)
        negatives = sum(math.exp(q[i] @ queue[:, j] / tau) for j in range(queue.shape[1]))
        losses.append(-math.log(positive / (positive + negatives)))
    return float(np.mean(losses))


def test_loss_matches_the_paper():
    g = torch.Generator().manual_seed(0)
    unit = lambda *shape, dim: F.normalize(torch.randn(*shape, generator=g), dim=dim)  # noqa: E731
    q1, q2, k1, k2 = (unit(6, 5, dim=1) for _ in range(4))
    queue1, queue2 = unit(5, 9, dim=0), unit(5, 9, dim=0)
    loss = moby_loss(q1, q2, k1, k2, queue1, queue2, 0.2)
    # Symmetric: view 1 queries its partner key k2 among view 2's queue, and the other way round.
    expected = paper_infonce(q1, k2, queue2, 0.2) + paper_infonce(q2, k1, queue1, 0.2)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_queue_must_hold_whole_batches(tmp_path):
    with pytest.raises(ConfigError, match="objective.queue_size"):
        tiny_config(tmp_path, *TINY_MOBY, "objective.queue_size=10")


def test_forward_fills_the_queues_in_order(tmp_path):
    torch.manual_seed(0)
    objective = tiny_objective(tiny_config(tmp_path, *TINY_MOBY, "model.drop_path=0.2"), 5)
    # Asymmetric drop path: the online encoder drops paths, the target never does.
    assert any(m.drop_prob > 0 for m in objective.online["encoder"].modules() if hasattr(m, "drop_prob"))
    assert all(m.drop_prob == 0 for m in objective.target.modules() if hasattr(m, "drop_prob"))
    before = objective.queue1.clone()
    for step in range(4):
        batch = {"views": torch.randint(0, 256, (4, 2, 3, 32, 32), dtype=torch.uint8)}
        loss, metrics = objective(batch, step)
        assert torch.isfinite(loss) and {"embedding_std", "key_std", "positive_sim"} <= set(metrics)
        assert int(objective.queue_ptr) == (step + 1) * 4 % 12
    loss.backward()
    assert all(p.grad is None for p in objective.target.parameters())
    assert objective.online["predictor"].net[0].weight.grad.abs().sum() > 0
    # Three batches filled the queue; the fourth overwrote the first four columns.
    assert not torch.equal(objective.queue1, before)
    assert torch.allclose(objective.queue1.norm(dim=0), torch.ones(12), atol=1e-5)
    assert objective.momentum(0) == pytest.approx(0.99)
    assert objective.backbone() is objective.online["encoder"]


def test_two_views_are_different_uint8_crops():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    random.seed(0)
    views = TwoView(16, (0.2, 1.0))(image)["views"]
    assert views.shape == (2, 3, 16, 16) and views.dtype == torch.uint8
    assert not torch.equal(views[0], views[1])
