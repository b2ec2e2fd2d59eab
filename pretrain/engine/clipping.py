"""Per-parameter gradient clipping, as DINO's ``utils.clip_gradients`` does, on every ZeRO stage.

DeepSpeed clips the global norm only; DINO clips each parameter's gradient by its own norm. Under
ZeRO each rank holds pieces of the reduced gradients, so the norms are assembled from the pieces.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.dist import DistEnv
from pretrain.engine.imports import import_deepspeed
from pretrain.engine.precision import loss_scale_state


def clip_each_parameter(module: nn.Module, wrapper, dist: DistEnv, clip: float) -> torch.Tensor:
    """Scale each parameter's gradient by ``clip / (norm + 1e-6)`` where that is below 1, ``norm``
    being the norm of the parameter's whole (unscaled) gradient; returns the global norm before
    clipping (a 0-d device tensor: nothing here waits for the device). A collective: call on every
    rank after the last backward of an optimizer step, before DeepSpeed's step. ``wrapper``:
    DeepSpeed's optimizer.

    The reduced gradients are read where DeepSpeed keeps them until its step (see
    :func:`local_grads`). Where a parameter's gradient is split over ranks, each rank's pieces'
    squares are summed by one all-reduce of a vector with an entry per parameter. fp16's loss scale
    is divided out of the norms, so the threshold applies to the true gradient."""
    params = [p for p in module.parameters() if p.requires_grad]
    grads, replicated = local_grads(params)
    device = dist.device
    squares = torch.stack([g.float().pow(2).sum() if g is not None and g.numel() else
                           torch.zeros((), device=device) for g in grads]).to(device, torch.float64)
    if not replicated:
        dist.all_reduce(squares)
    norms = squares.sqrt() / loss_scale(wrapper)
    # Multiplying by exactly 1.0 where the norm is under the threshold leaves those gradients as they are.
    coefs = (clip / (norms + 1e-6)).clamp(max=1.0).float()
    for p, grad, coef in zip(params, grads, coefs.unbind()):
        if grad is not None:
            grad.mul_(coef)
            if hasattr(p, "ds_id"):  # ZeRO-3 hands out an fp32 copy of a lower-precision partition
                import_deepspeed().utils.safe_set_local_grad(p, grad)
    return norms.pow(2).sum().sqrt().float()


def local_grads(params: list[nn.Parameter]) -> tuple[list[torch.Tensor | None], bool]:
    """The reduced gradient of each parameter held on this rank, as tensors that DeepSpeed's step
    reads (scaling them in place scales what the optimizer gets), and whether every rank holds all
    of them rather than disjoint pieces.

    ZeRO-3: the rank's partition of each gradient. ZeRO-1/2, and DeepSpeed's BF16_Optimizer (bf16
    without ZeRO in some DeepSpeed versions): the fragment of each gradient that belongs to the
    rank's part of the flat fp32 master weights (its ``_hp_mapping``; None when another rank owns
    all of it). Otherwise (no ZeRO: a torch optimizer, or DeepSpeed's fp16/bf16 optimizers that copy
    ``param.grad`` at their step): ``param.grad``, whole on every rank."""
    safe_get_local_grad = import_deepspeed().utils.safe_get_local_grad
    grads, replicated = [], True
    for p in params:
        if hasattr(p, "ds_id"):
            replicated = False
            grads.append(safe_get_local_grad(p).view(-1))
        elif hasattr(p, "_hp_mapping"):
            replicated = False
            mapping = p._hp_mapping
            if mapping is None:
                grads.append(None)
                continue
            fragment = mapping.get_lp_grad_fragment(p._index_in_param_group).view(-1)
            address = mapping.lp_fragment_address
            if fragment.numel() != address.numel:  # BF16_Optimizer keeps whole gradients on every rank
                fragment = fragment.narrow(0, address.start, address.numel)
            grads.append(fragment)
        else:
            grads.append(None if p.grad is None else p.grad.view(-1))
    return grads, replicated


def loss_scale(wrapper) -> float:
    """The factor the gradients held before the step are multiplied by (fp16's loss scale, else 1)."""
    state = loss_scale_state(wrapper)
    if state is not None:
        return state[0]
    for scale in (getattr(wrapper, "loss_scale", None),  # a static fp16 scale: ZeRO's, FP16_Optimizer's config
                  getattr(getattr(wrapper, "loss_scale_config", None), "cur_scale", None)):
        if isinstance(scale, (int, float)) and scale > 0:
            return float(scale)
    return 1.0
