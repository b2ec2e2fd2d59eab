"""Skipping an optimizer step on the device: no host sync decides it.

Whether a step is taken used to be read on the host (the loss's finiteness, DeepSpeed's overflow
checks), a stall of the GPU's queue per step and, at ZeRO-0 in DeepSpeed's bf16, one per parameter
tensor. Here the decision stays a 0-d device tensor: 1.0 where the ranks' losses or the reduced
gradients were not finite. torch's fused AdamW takes it as ``found_inf`` and then leaves weights,
moments and step counts exactly as they were; the momentum teachers scale their update by it; the
step guard counts it on the device and reads the counts at log steps.
"""

from __future__ import annotations

import torch

from pretrain.engine.imports import import_deepspeed


def invalid_norm(norm: torch.Tensor) -> torch.Tensor:
    """1.0 where the gradient norm ``norm`` (a 0-d tensor) is not finite or is DeepSpeed's -1 (its
    helpers' mark for an inf or NaN among the groups), else 0.0."""
    return (~(torch.isfinite(norm) & (norm >= 0))).float()


def leave_norm_checks_to_the_device() -> None:
    """DeepSpeed's ZeRO optimizers read their global gradient norm on the host each step to skip a
    non-finite one (``is_invalid_grad_norm``: a sync). With the inner optimizer skipping on the
    device from that same norm, the host's verdict on a tensor norm is "valid": a non-finite norm
    then makes non-finite clipped gradients, which the fused AdamW refuses as a whole. Numbers
    (offloaded optimizers' norms, already on the host) are still checked there. Not for fp16,
    whose loss scaler needs DeepSpeed to see its overflows."""
    import_deepspeed()
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    for module in (stage_1_and_2, stage3):
        check = module.is_invalid_grad_norm
        if getattr(check, "leaves_tensors_to_the_device", False):
            continue

        def on_host_only(norm, check=check):
            return False if torch.is_tensor(norm) else check(norm)

        on_host_only.leaves_tensors_to_the_device = True
        module.is_invalid_grad_norm = on_host_only
