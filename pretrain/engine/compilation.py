"""torch.compile of the objective's backbone, in place."""

from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.sections import ConfigError


def compile_backbone(module: nn.Module) -> None:
    """torch.compile, in place, the backbone of ``module`` (an objective), else ``module`` itself.

    The backbone is where the time goes; the objective's own Python (Mixup, teachers, queues) stays
    eager. In place (``nn.Module.compile``), so parameter names, checkpoints and exports do not
    change. ``dynamic=False``: one graph per input shape (DINO's global and local crops make two).
    Under ZeRO-3, DeepSpeed's gather hooks are excluded from compilation (graph breaks per module).
    """
    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError("engine.compile=true: torch.compile is not supported by this Python or PyTorch build")
    target = module.backbone() if callable(getattr(module, "backbone", None)) else module
    target.compile(dynamic=False)


