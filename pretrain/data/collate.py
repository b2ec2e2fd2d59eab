"""The collate stage: a worker's viewed samples -> one batch, handed over with where it leaves the
worker's stream and the faults the worker met on the way to it.

Those travel beside the batch (:class:`WorkerBatch`), not inside it: the batch holds only what the
trainer uses (the views, ``label``, the samples' ``__keys__``, and any JPEGs left to the device).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch.utils.data._utils.pin_memory import pin_memory

from pretrain.data import device_decode
from pretrain.data.faults import Faults


@dataclass
class WorkerBatch:
    """A batch as a worker yields it. ``role``: the part of the stream the worker plays;
    ``position``: (epoch, raw sample) where that part goes on after this batch; ``faults``: the
    skips and broken shards since the worker's previous batch, and the samples it tried."""

    batch: dict
    role: int
    position: tuple[int, int]
    faults: Faults

    def pin_memory(self) -> "WorkerBatch":
        """The DataLoader's pinning calls this: only the batch holds tensors."""
        return replace(self, batch=pin_memory(self.batch))


def collate(items: list[dict], role: int, position: tuple[int, int], faults: Faults) -> WorkerBatch:
    """``items`` (views, ``label``, ``__key__``) stacked into one batch."""
    keys = [item.pop("__key__") for item in items]
    batch = device_decode.collate(items, keys)  # default_collate, leaving JPEGs for the device to decode
    batch["__keys__"] = keys
    return WorkerBatch(batch, role, position, faults)
