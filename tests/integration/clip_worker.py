"""One rank of the per-parameter clipping check (run by test_clip_per_param.py on 2 processes).

A tiny model takes one optimizer step through the Engine with ``train.clip_mode=per_param`` on each
(ZeRO stage, precision) given. The reference is plain torch on the whole batch of both ranks: the
averaged gradients clipped by DINO's ``clip_gradients`` (written out below), then the same AdamW
step. AdamW with a large eps makes the first update nearly proportional to the gradient, so the
clipping shows in the weights. Rank 0 writes, per case, the largest error relative to the largest
update, and how far the unclipped update is from the clipped one (to show the check can fail).
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.nn as nn

from pretrain.config import load_config
from pretrain.dist import init_distributed
from pretrain.engine import Engine
from tests.helpers import finish_worker

LR, EPS, WORLD = 1.0, 1.0, 2


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Parameter(torch.randn(1, 5, 16) * 0.02)  # a token-like 3-D parameter
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dtype = self.fc1.weight.dtype
        h = self.norm(torch.relu(self.fc1((x + self.embed[:, :, :].mean(1, keepdim=True)).to(dtype))))
        return ((self.fc2(h).float() - target) ** 2).mean() * 10


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(4, 1, 16, generator=g), torch.randn(4, 1, 8, generator=g)


def dino_clip_gradients(model: nn.Module, clip: float) -> list[float]:
    """DINO's utils.clip_gradients: each parameter's gradient norm clipped to ``clip``."""
    norms = []
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.data.norm(2)
            norms.append(norm.item())
            coef = clip / (norm + 1e-6)
            if coef < 1:
                p.grad.data.mul_(coef)
    return norms


def reference(initial: nn.Module, clip: float | None) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(initial)
    loss = sum(model(*batch(r)) for r in range(WORLD)) / WORLD  # DeepSpeed averages over ranks
    loss.backward()
    if clip is not None:
        dino_clip_gradients(model, clip)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0)
    optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def grad_norms(initial: nn.Module) -> list[float]:
    model = copy.deepcopy(initial)
    (sum(model(*batch(r)) for r in range(WORLD)) / WORLD).backward()
    return [p.grad.norm().item() for p in model.parameters()]


def run_case(dist, initial: nn.Module, clip: float, stage: int, precision: str) -> dict[str, torch.Tensor]:
    cfg = load_config(None, ["data.synthetic=true", "train.steps=1", "data.batch_size=4", f"optim.eps={EPS}",
                             f"train.clip_grad={clip}", "train.clip_mode=per_param", f"engine.zero_stage={stage}",
                             f"engine.precision={precision}",
                             # fp16: a loss scale of 2^8 neither overflows nor hides a missing unscale
                             "engine.deepspeed={zero_optimization: {stage3_param_persistence_threshold: 0}, "
                             "fp16: {initial_scale_power: 8}}"])
    module = copy.deepcopy(initial)
    engine = Engine(module, [{"params": list(module.parameters())}], cfg, dist)
    engine.set_hyperparameters(LR, 0.0)
    loss = engine.forward(*batch(dist.rank))
    engine.backward(loss)
    engine.step()
    return engine.full_fp32_state_dict(engine.module)


def main() -> None:
    result_path, cases = sys.argv[1:]
    dist = init_distributed()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    initial = Tiny()
    norms = sorted(grad_norms(initial))
    clip = norms[len(norms) // 2] * 0.5  # the larger half of the gradients is clipped at least 2x
    start = {n: p.detach().clone() for n, p in initial.named_parameters()}
    clipped, unclipped = reference(initial, clip), reference(initial, None)
    scale = max((clipped[n] - start[n]).abs().max().item() for n in start)
    results = {"clip": clip, "norms": norms,
               "unclipped": max((unclipped[n] - clipped[n]).abs().max().item() for n in start) / scale}
    for case in json.loads(cases):
        stage, precision = case.split("-")
        weights = run_case(dist, initial, clip, int(stage), precision)
        results[case] = max((weights[n] - clipped[n]).abs().max().item() for n in start) / scale
    finish_worker(dist, result_path, results)


if __name__ == "__main__":
    main()
