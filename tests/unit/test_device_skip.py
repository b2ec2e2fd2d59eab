"""A step is skipped on the device: torch's fused AdamW, handed the skip flag, leaves weights,
moments and step counts exactly as they were, and takes the next step as if the skipped one had
never been asked for; a momentum teacher lerps by exactly 0 on a skipped step."""

from __future__ import annotations

import copy

import torch

from pretrain.engine import SkippableAdamW
from pretrain.engine.device_skip import invalid_norm


def optimizer_and_weights():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    return SkippableAdamW([{"params": weights}], lr=1e-2, weight_decay=0.05, fused=True), weights


def step(optimizer, weights, skip, seed):
    torch.manual_seed(seed)
    for w in weights:
        w.grad = torch.randn_like(w)
    optimizer.skip = skip
    try:
        optimizer.step()
    finally:
        optimizer.skip = False


def test_a_step_skipped_on_the_device_changes_nothing_and_the_next_one_is_exact():
    skipped, weights = optimizer_and_weights()
    reference, reference_weights = optimizer_and_weights()
    for opt, ws in ((skipped, weights), (reference, reference_weights)):
        step(opt, ws, torch.tensor(0.0), seed=1)
    before = [w.detach().clone() for w in weights], copy.deepcopy(skipped.state_dict())
    step(skipped, weights, torch.tensor(1.0), seed=2)
    assert all(torch.equal(a, b) for a, b in zip(before[0], weights))
    after = skipped.state_dict()["state"]
    for key, state in before[1]["state"].items():
        assert all(torch.equal(state[k], after[key][k]) for k in ("step", "exp_avg", "exp_avg_sq")), key
    for opt, ws in ((skipped, weights), (reference, reference_weights)):
        step(opt, ws, torch.tensor(0.0), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(weights, reference_weights))


def test_non_finite_gradients_skip_the_step_through_the_engines_flag():
    optimizer, weights = optimizer_and_weights()
    norm = torch.tensor(float("nan"))
    optimizer.nonfinite_gradients = lambda: invalid_norm(norm)
    before = [w.detach().clone() for w in weights]
    step(optimizer, weights, False, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(before, weights))
    norm = torch.tensor(2.0)
    step(optimizer, weights, False, seed=1)
    assert not torch.equal(before[0], weights[0])


def test_deepspeeds_negative_norm_mark_counts_as_not_finite():
    assert [invalid_norm(torch.tensor(v)).item() for v in (1.0, -1.0, float("inf"), float("nan"))] == [0, 1, 1, 1]
