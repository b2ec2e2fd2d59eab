"""Time-varying hyper-parameters as pure functions of the optimizer step.

Being pure, they need no state in checkpoints: a resumed run recomputes the same values.
"""

from __future__ import annotations

import math


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at ``total_steps`` (and after)."""
    progress = min(max(step, 0) / max(total_steps, 1), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, total_steps: int, peak: float, final: float, warmup_steps: int) -> float:
    """Linear warm-up reaching ``peak`` at the last warm-up step, then a cosine down to ``final``.

    The first step already gets ``peak / warmup_steps``, so no step is wasted at lr 0.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, final)


def scaled_lr(base_lr: float, base_batch: int, global_batch: int) -> float:
    """The linear scaling rule (Goyal et al. 2017): lr grows with the global batch."""
    return base_lr * global_batch / base_batch
