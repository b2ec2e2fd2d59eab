"""Where numbers go, on rank 0: TensorBoard (``tb/``), ``metrics.jsonl`` and a progress bar.

On resume, both logs drop what was written after the checkpoint's step, so a requeued run's curves
continue the uninterrupted ones without duplicates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from pretrain.dist import DistEnv


def memory_gib(device: torch.device) -> float:
    """Peak accelerator memory, or the process's resident memory on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30


class Metrics:
    def __init__(self, run_dir: str | Path, dist: DistEnv, start_step: int, total_steps: int,
                 progress: bool = True) -> None:
        self.enabled = dist.is_main
        self.jsonl = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        self.bar = None
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._truncate_jsonl(start_step)
        self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step or None)
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not progress, smoothing=0.1)

    def _truncate_jsonl(self, start_step: int) -> None:
        if not self.jsonl.exists():
            return
        kept = [line for line in self.jsonl.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= start_step]
        self.jsonl.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, values: dict[str, float]) -> None:
        """``values`` keyed ``section/name`` (``train/loss``, ``val/top1``, ``data/skipped_undecodable``)."""
        if not self.enabled:
            return
        for key, value in values.items():
            self.tb.add_scalar(key, value, step)
        record = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def progress(self, steps: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def write(self, message: str) -> None:
        """A log line that does not break the progress bar."""
        if self.enabled:
            tqdm.write(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
