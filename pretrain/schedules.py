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


def scaled_lr(base_lr: float, base_batch: int, global_batch: int, rule: str = "linear") -> float:
    """``base_lr`` (per ``base_batch``) at ``global_batch``: the linear scaling rule (Goyal et al.
    2017) or, with ``rule="sqrt"``, the square-root rule (DINOv2's ``sqrt_wrt_1024``)."""
    ratio = global_batch / base_batch
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    if rule != "linear":
        raise ValueError(f"rule={rule!r}: expected 'linear' or 'sqrt'")
    return base_lr * ratio


def group_lr(step: int, total_steps: int, peak: float, final: float, warmup_steps: int, lr_scale: float,
             floor: str = "scaled") -> float:
    """The lr of a parameter group with multiplier ``lr_scale``: the whole schedule scaled
    (``floor="scaled"``), or the group's own warm-up and cosine from ``peak * lr_scale`` to the
    unscaled ``final`` (``floor="shared"``, timm's CosineLRScheduler on groups of several lrs)."""
    if floor == "shared":
        return warmup_cosine(step, total_steps, peak * lr_scale, final, warmup_steps)
    return warmup_cosine(step, total_steps, peak, final, warmup_steps) * lr_scale
