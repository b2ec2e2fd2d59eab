import math

import pytest

from pretrain.schedules import cosine, scaled_lr, warmup_cosine


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
