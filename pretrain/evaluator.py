"""Validation during and at the end of a run: when it is due, and the pass over the validation set."""

from __future__ import annotations

from typing import Iterable

import torch
from PIL import Image
from torch.utils.data._utils.collate import default_collate

from pretrain.dist import DistEnv


class Evaluator:
    def __init__(self, objective, engine, val_loader: Iterable[dict] | None, dist: DistEnv, every: int,
                 image_size: int) -> None:
        """``every`` is ``train.eval_every`` (0: only at the end); ``image_size`` (``data.image_size``)
        sizes the placeholder batches; no ``val_loader``: nothing to evaluate."""
        self.objective, self.engine, self.val_loader, self.dist = objective, engine, val_loader, dist
        self.every, self.image_size = every, image_size

    def due(self, step: int, end: int) -> bool:
        """After ``step`` steps: every ``every`` steps before ``end`` (the end evaluates anyway)."""
        return bool(self.every) and step % self.every == 0 and step < end

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Every validation sample once across ranks; metrics are ``sum / count`` over all of them."""
        if self.val_loader is None:
            return {}
        self.engine.eval()
        sums: dict[str, torch.Tensor] = {}
        batches = iter(self.val_loader)
        placeholder = None
        while True:
            batch = next(batches, None)
            # Under ZeRO-3 a forward gathers weights from every rank, so ranks whose share of the
            # validation set ran out keep stepping (on a placeholder) until all are done.
            more = torch.tensor(float(batch is not None), device=self.dist.device)
            if not self.dist.all_reduce(more, "max").item():
                break
            if batch is None:
                placeholder = placeholder or self._placeholder_batch()
            else:
                placeholder = batch
            with self.engine.autocast():
                out = self.objective.val_step(self._to_device(placeholder))
            if batch is not None:
                for key, value in out.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().float()
        self.engine.train()
        totals = self.dist.sum_counts({k: v.item() for k, v in sums.items()})
        count = totals.pop("count", 0)
        return {f"val/{k}": v / max(count, 1) for k, v in sorted(totals.items())}

    def _placeholder_batch(self) -> dict:
        view = self.objective.eval_view()(Image.new("RGB", (self.image_size, self.image_size)))
        return default_collate([{**view, "label": 0}])

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.dist.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items() if not k.startswith("__")}
