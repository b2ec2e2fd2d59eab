import math

import pytest

from pretrain.schedules import cosine, group_lr, scaled_lr, warmup_cosine


def test_warmup_is_linear_and_reaches_peak_on_its_last_step():
    values = [warmup_cosine(s, 100, 1.0, 0.0, 10) for s in range(10)]
    assert values == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert warmup_cosine(10, 100, 1.0, 0.0, 10) == pytest.approx(1.0)


def test_cosine_decays_to_final_and_halfway_is_the_mean():
    assert warmup_cosine(55, 100, 1.0, 0.1, 10) == pytest.approx(0.55)
    assert warmup_cosine(100, 100, 1.0, 0.1, 10) == pytest.approx(0.1)
    values = [warmup_cosine(s, 100, 1.0, 0.1, 10) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cosine_without_warmup_and_rising_schedules():
    assert cosine(0, 50, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine(50, 50, 0.04, 0.4) == pytest.approx(0.4)
    assert cosine(25, 50, 0.996, 1.0) == pytest.approx(0.998)
    assert math.isclose(cosine(80, 50, 0.996, 1.0), 1.0)


def test_linear_scaling_rule():
    assert scaled_lr(5e-4, 256, 1024) == pytest.approx(2e-3)


def test_square_root_scaling_rule():
    assert scaled_lr(4e-3, 1024, 2048, "sqrt") == pytest.approx(4e-3 * math.sqrt(2))
    assert scaled_lr(4e-3, 1024, 256, "sqrt") == pytest.approx(2e-3)


def test_layer_decay_groups_end_at_a_scaled_or_a_shared_floor():
    # A group at a quarter of the lr: "scaled" is the whole schedule times 0.25 (DINOv2); "shared"
    # warms up to 0.25 x peak and ends at the unscaled floor (timm's CosineLRScheduler).
    scaled = [group_lr(s, 100, 1.0, 0.1, 10, 0.25) for s in (0, 55, 100)]
    assert scaled == pytest.approx([0.025, 0.1375, 0.025])
    shared = [group_lr(s, 100, 1.0, 0.1, 10, 0.25, "shared") for s in (0, 55, 100)]
    assert shared == pytest.approx([0.025, 0.175, 0.1])
