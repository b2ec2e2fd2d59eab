"""Collapse monitors shared by the self-supervised objectives.

The numbers go to TensorBoard as metrics; :class:`CollapseWatch` also turns them into a warning in
the log, looking at the last micro-batch's values once every ``train.log_every`` steps (one host
sync there, none on other steps).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger("pretrain.collapse")


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of L2-normalized embeddings, times sqrt(dim): about 1 for embeddings
    spread over the sphere, 0 when every sample maps to the same point."""
    z = F.normalize(z.detach().float(), dim=-1)
    return z.std(dim=0).mean() * math.sqrt(z.shape[-1])


def entropy(p: torch.Tensor) -> torch.Tensor:
    """The entropy (nats) of each distribution along the last dimension of the probabilities ``p``."""
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


class CollapseWatch:
    """Remembers the latest monitor values and warns when one crosses its limit."""

    def __init__(self, every: int, is_main: bool) -> None:
        self.every, self.is_main = every, is_main
        self.latest: dict[str, torch.Tensor] = {}

    def record(self, values: dict[str, torch.Tensor]) -> None:
        self.latest = values

    def check(self, step: int, low: dict[str, float], high: dict[str, float] | None = None) -> list[str]:
        """Warnings for values below ``low[name]`` or above ``high[name]``, every ``every`` steps."""
        if (step + 1) % self.every or not self.latest:
            return []
        found = []
        for bounds, below in ((low, True), (high or {}, False)):
            for name, limit in bounds.items():
                if name not in self.latest:
                    continue
                value = float(self.latest[name])
                if (value < limit) if below else (value > limit):
                    found.append(f"{name}={value:.4g} is {'below' if below else 'above'} {limit:.4g}")
        if found and self.is_main:
            log.warning("step %d: possible collapse: %s", step + 1, "; ".join(found))
        return found
