"""One rank of the DINOv2 checks (run by test_dinov2.py on 2 processes): Sinkhorn-Knopp on this
rank's part of a known batch (the parts of unequal size, as masked patches are), then the training
runs of simmim_worker's kind, in one process group."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from pretrain.dist import init_distributed
from pretrain.objectives.dinov2 import sinkhorn_knopp
from tests.helpers import end_worker
from tests.integration.simmim_worker import run_cases

SINKHORN_SPLIT = 7  # rows of rank 0


def sinkhorn_logits() -> torch.Tensor:
    return torch.randn(16, 6, generator=torch.Generator().manual_seed(1))


def main() -> None:
    out_dir, result_path, cases = sys.argv[1:]
    dist = init_distributed()
    torch.set_num_threads(1)
    logits = sinkhorn_logits()
    part = logits[:SINKHORN_SPLIT] if dist.rank == 0 else logits[SINKHORN_SPLIT:]
    torch.save(sinkhorn_knopp(part, 0.07, dist), Path(out_dir) / f"sinkhorn.{dist.rank}.pt")
    run_cases(dist, out_dir, result_path, cases)
    end_worker()


if __name__ == "__main__":
    main()
