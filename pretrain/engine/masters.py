"""Where the fp32 master weights live, per ZeRO stage and precision, and reading them whole.

The momentum teachers follow the masters (:func:`master_slices`, no communication) and exports and
probes read them whole (:func:`full_fp32_state_dict`, a collective under ZeRO-3).
"""

from __future__ import annotations


import torch
import torch.nn as nn

from pretrain.dist import DistEnv
from pretrain.engine.imports import import_deepspeed
from pretrain.engine.partitions import MasterSlice, local_shard


def master_slices(wrapper, params: list[nn.Parameter], rank: int, masters_on_disk: bool,
                  refusal: str) -> list[MasterSlice]:
    """Where each trainable parameter's fp32 master weights live on this rank; no communication.

    ``wrapper``: DeepSpeed's optimizer. ZeRO-3: the rank's partition; ZeRO-1/2 and bf16 without
    ZeRO: the rank's fragment of the optimizer's flat fp32 buffer; fp32 without ZeRO: the parameter
    itself. Views stay valid until the next load. ``masters_on_disk``: ZeRO-3 with the optimizer state
    on NVMe, where the rank's partition of the compute copy stands for them. RuntimeError(``refusal``)
    where a run keeps no fp32 masters at all.
    """
    flat_masters = flat_fp32_masters(wrapper)
    safe_get_local_fp32_param = import_deepspeed().utils.safe_get_local_fp32_param
    out = []
    for p in params:
        if hasattr(p, "ds_id"):
            values = local_shard(p) if masters_on_disk else safe_get_local_fp32_param(p).view(-1)
            out.append(MasterSlice(values, rank * p.ds_tensor.ds_numel, True))
        elif hasattr(p, "_hp_mapping"):
            mapping = p._hp_mapping
            if mapping is None:
                out.append(MasterSlice(None, 0, False))
            else:
                out.append(MasterSlice(mapping.get_hp_fragment().view(-1), mapping.lp_fragment_address.start, False))
        elif id(p) in flat_masters:
            out.append(MasterSlice(flat_masters[id(p)], 0, False))
        elif p.dtype == torch.float32:
            out.append(MasterSlice(p.data.view(-1), 0, False))
        else:
            raise RuntimeError(refusal)
    return out


def flat_fp32_masters(wrapper) -> dict[int, torch.Tensor]:
    """Mixed precision without ZeRO keeps whole fp32 copies of the parameters (DeepSpeed's
    FP16_Optimizer, flat per group, or FP16_UnfusedOptimizer, one per parameter; also for bf16)."""
    views = {}
    low = getattr(wrapper, "fp16_groups", ())
    if hasattr(wrapper, "fp32_groups_flat"):
        for group, flat in zip(low, wrapper.fp32_groups_flat):
            offset = 0
            for p in group:
                views[id(p)] = flat.data[offset:offset + p.numel()]
                offset += p.numel()
    elif hasattr(wrapper, "fp32_groups"):
        for group, masters in zip(low, wrapper.fp32_groups):
            views.update({id(p): m.data.view(-1) for p, m in zip(group, masters)})
    return views


def full_fp32_state_dict(wrapper, module: nn.Module, dist: DistEnv, main_only: bool = False) -> dict[str, torch.Tensor]:
    """``module``'s state dict with every parameter from the fp32 master weights, on the CPU.

    A collective under ZeRO-3 (every rank must call it), one parameter at a time; every rank gets the
    full result, or with ``main_only`` only the main rank (the others an empty dict: they never hold
    the whole module).
    """
    params = {}
    keep = dist.is_main or not main_only
    flat_masters = flat_fp32_masters(wrapper)  # mixed precision without ZeRO
    safe_get_full_fp32_param = import_deepspeed().utils.safe_get_full_fp32_param
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if not keep:
            continue
        if full is None and id(p) in flat_masters:
            full = flat_masters[id(p)].view_as(p)
        params[name] = (full if full is not None else p.detach()).float().cpu().clone()
    if not keep:
        return {}
    state = {}
    for name, value in module.state_dict().items():
        state[name] = params[name] if name in params else value.detach().cpu().clone()
    return state


def weights_finite(module: nn.Module, dist: DistEnv) -> bool:
    """Whether every rank's share of ``module``'s weights is finite (a collective)."""
    bad = torch.zeros((), device=dist.device)
    for p in module.parameters():
        local = p.ds_tensor if hasattr(p, "ds_tensor") else p  # ZeRO-3 holds a partition
        if not torch.isfinite(local).all():
            bad.fill_(1.0)
            break
    return dist.all_reduce(bad, "max").item() == 0
