"""torch.compile of the objective's step: its views, forwards, heads and loss as one graph."""

from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.sections import ConfigError


def compile_steps(module: nn.Module, backend: str = "inductor") -> None:
    """torch.compile the methods that ``module`` (an objective) names in ``compiled_steps``, each
    replaced on the instance by its compiled version; a module that names none is compiled whole, in
    place (``nn.Module.compile``).

    The objective's per-micro-batch compute (device-side views, student and teacher forwards, heads,
    loss, centre and queue updates) is one function of tensors, so it compiles to one graph;
    the host-side bookkeeping around it (per-step schedules, masks drawn on the host, the teacher's
    EMA after the optimizer step) stays in Python. Methods are compiled, not modules wrapped, so
    parameter names, checkpoints and exports do not change. ``dynamic=False``: one graph per input
    shape (the batch's; a last, smaller batch of validation compiles once more).

    Graph breaks: none at ZeRO 0-2 (tests/integration/test_compile.py, one process; DINO and
    DINOv2 on two processes as well, their all-reduces traced). Under ZeRO-3 DeepSpeed's gathering
    hooks run outside the graph, breaking it at the modules they hook (measured on one process:
    59 breaks for a one-block SimMIM ViT, 122 for DINO). MoBY's synchronized batch norm sums over
    the ranks with functional collectives, which are traced (pretrain.dist.all_reduce_differentiable).
    """
    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError("engine.compile=true: torch.compile is not supported by this Python or PyTorch build")
    names = getattr(module, "compiled_steps", None)
    if names is None:
        module.compile(backend=backend, dynamic=False)
        return
    for name in names:
        setattr(module, name, torch.compile(getattr(module, name), backend=backend, dynamic=False))
