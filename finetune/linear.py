"""Linear probe: a grid of linear heads (feature variants x learning rates) trained together on cached
frozen features, as DINOv2 does; every head and the best one are reported.

Data-parallel over ranks: each rank draws mini-batches from its own share of the cached training
features and the heads' gradients are averaged across ranks, so the grid sees the whole training
set; accuracy counts are summed over every rank's share of the validation features.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from finetune.config import LinearConfig, LinearSection
from finetune.features import Features, FeatureExtractor
from pretrain.config import ConfigError
from pretrain.data.stream import Loader, ShardDataset
from pretrain.data.transforms import SupervisedTrainView
from pretrain.dist import DistEnv
from pretrain.files import atomic_write
from pretrain.schedules import cosine, scaled_lr

log = logging.getLogger(__name__)


class HeadGrid(nn.Module):
    """One linear classifier (optionally after a BatchNorm without affine) per (variant, lr)."""

    def __init__(self, dims: dict[str, int], lrs: list[float], num_classes: int, batchnorm: bool) -> None:
        super().__init__()
        self.keys = [(variant, lr) for variant in dims for lr in lrs]
        heads = []
        for variant, _ in self.keys:
            linear = nn.Linear(dims[variant], num_classes)
            nn.init.normal_(linear.weight, std=0.01)  # DINO's initialization
            nn.init.zeros_(linear.bias)
            norm = nn.BatchNorm1d(dims[variant], affine=False) if batchnorm else nn.Identity()
            heads.append(nn.Sequential(norm, linear))
        self.heads = nn.ModuleList(heads)

    def name(self, i: int) -> str:
        variant, lr = self.keys[i]
        return f"{variant}_lr{lr:g}"

    def forward(self, variants: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [head(variants[variant]) for head, (variant, _) in zip(self.heads, self.keys)]


def scaled_lrs(section: LinearSection, global_batch: int) -> list[float]:
    return [scaled_lr(lr, section.base_batch, global_batch) for lr in section.lrs]


Batch = tuple[dict[str, torch.Tensor], torch.Tensor]  # {variant: features}, labels


def cached_batches(train: Features, batch_size: int, dist: DistEnv, seed: int) -> Iterator[Batch | None]:
    """Endless shuffled mini-batches of this rank's cached features (None when it holds none)."""
    local = {name: value.to(dist.device) for name, value in train.variants.items()}
    labels = train.labels.to(dist.device)
    generator = torch.Generator().manual_seed(seed * 1000 + dist.rank)
    while True:
        if not len(labels):
            yield None
            continue
        order = torch.randperm(len(labels), generator=generator).to(dist.device)
        for start in range(0, max(len(order) - batch_size, 0) + 1, batch_size):  # full batches only
            index = order[start:start + batch_size]
            yield {k: v[index] for k, v in local.items()}, labels[index]


def augmented_batches(extractor: FeatureExtractor, urls: list[str], cfg: LinearConfig,
                      dist: DistEnv) -> Iterator[Batch]:
    """Features of freshly augmented crops (DINO's protocol): random resized crop and flip per sample."""
    d, s = cfg.data, cfg.linear
    view = SupervisedTrainView(d.image_size, tuple(s.crop_scale), (3 / 4, 4 / 3), 0.5, None, 0.0,
                               cfg.features.interpolation, d.mean)
    dataset = ShardDataset(urls, view, s.batch_size, rank=dist.rank, world_size=dist.world_size,
                           seed=cfg.run.seed, train=True, shuffle_buffer=d.shuffle_buffer)
    for batch in Loader(dataset, d.workers, pin_memory=d.pin_memory and dist.device.type == "cuda"):
        yield extractor.of_batch(batch["image"], d.mean, d.std, dist.device), batch["label"].to(dist.device)


def fit_grid(batches: Iterator[Batch | None], total: int, dims: dict[str, int], num_classes: int,
             section: LinearSection, dist: DistEnv, seed: int = 0) -> HeadGrid:
    """The grid trained for ``total`` steps on ``batches`` (a collective: gradients averaged over ranks)."""
    lrs = scaled_lrs(section, section.batch_size * dist.world_size)
    torch.manual_seed(seed)  # the same initial heads on every rank
    grid = HeadGrid(dims, lrs, num_classes, section.batchnorm).to(dist.device)
    groups = [{"params": list(head.parameters()), "lr": lr, "base_lr": lr}
              for head, (_, lr) in zip(grid.heads, grid.keys)]
    optimizer = torch.optim.SGD(groups, momentum=section.momentum, weight_decay=section.weight_decay)
    grid.train()
    for step in range(total):
        for group in optimizer.param_groups:  # cosine to zero, as DINO's linear evaluation
            group["lr"] = cosine(step, total, group["base_lr"], 0.0)
        batch = next(batches)
        if batch is not None:
            variants, labels = batch
            loss = sum(F.cross_entropy(out, labels) for out in grid(variants))
        else:  # a rank without training samples still takes part in the gradient average
            loss = sum(p.sum() * 0.0 for p in grid.parameters())
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        _average_gradients(grid, dist)
        optimizer.step()
    _average_running_stats(grid, dist)
    return grid


def total_steps(train_samples: int, section: LinearSection, dist: DistEnv) -> int:
    return max(1, train_samples // (section.batch_size * dist.world_size)) * section.epochs


def train_heads(train: Features, val: Features, num_classes: int, section: LinearSection, dist: DistEnv,
                seed: int = 0) -> dict:
    """Train the grid on this rank's cached ``train`` share (a collective), then measure it on ``val``.

    Returns ``{"heads": {name: {"top1", "top5"}}, "best": name, ...}`` (accuracies in percent).
    """
    dims = {name: value.shape[1] for name, value in train.variants.items()}
    samples = int(dist.all_reduce(torch.tensor(float(len(train)), device=dist.device)).item())
    total = total_steps(samples, section, dist)
    grid = fit_grid(cached_batches(train, section.batch_size, dist, seed), total, dims, num_classes, section,
                    dist, seed)
    return report(grid, val, section, dist, total)


def report(grid: HeadGrid, val: Features, section: LinearSection, dist: DistEnv, steps: int) -> dict:
    lrs = scaled_lrs(section, section.batch_size * dist.world_size)
    return evaluate(grid, val, dist) | {"lrs": dict(zip(map(grid.name, range(len(grid.keys))), lrs)),
                                        "steps": steps, "global_batch": section.batch_size * dist.world_size}


def _average_gradients(module: nn.Module, dist: DistEnv) -> None:
    if dist.world_size == 1:
        return
    grads = [p.grad for p in module.parameters()]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat).div_(dist.world_size)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _average_running_stats(module: nn.Module, dist: DistEnv) -> None:
    """Each rank's BatchNorm saw its own batches; evaluate every rank with the average statistics."""
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer).div_(dist.world_size)


@torch.no_grad()
def evaluate(grid: HeadGrid, val: Features, dist: DistEnv) -> dict:
    grid.eval()
    device = dist.device
    correct = torch.zeros(len(grid.keys), 2, device=device)  # top1, top5 per head
    labels = val.labels.to(device)
    for start in range(0, len(labels), 4096):
        chunk = {k: v[start:start + 4096].to(device) for k, v in val.variants.items()}
        for i, logits in enumerate(grid(chunk)):
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top.eq(labels[start:start + 4096, None])
            correct[i, 0] += hits[:, 0].sum()
            correct[i, 1] += hits.any(dim=1).sum()
    count = dist.all_reduce(torch.tensor(float(len(labels)), device=device)).item()
    correct = dist.all_reduce(correct) * (100.0 / max(count, 1))
    heads = {grid.name(i): {"top1": correct[i, 0].item(), "top5": correct[i, 1].item()}
             for i in range(len(grid.keys))}
    best = max(heads, key=lambda name: heads[name]["top1"])
    return {"heads": heads, "best": best, "best_top1": heads[best]["top1"], "val_samples": int(count)}


def write_report(report: dict, run_dir: str | Path, stage: str) -> Path:
    """``RUN_DIR/{stage}.json`` and TensorBoard scalars under ``{stage}/``; rank 0 only."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"{stage}.json"
    atomic_write(path, json.dumps(report, indent=1).encode())
    with SummaryWriter(str(run_dir / "tb")) as tb:
        for name, values in report.get("heads", {}).items():
            for metric, value in values.items():
                tb.add_scalar(f"{stage}/{metric}/{name}", value, 0)
    return path


def run(cfg: LinearConfig, dist: DistEnv, random_init: bool = False) -> dict:
    from finetune.features import cached_features

    s = cfg.linear
    if s.augment:  # only the validation features are cached; training crops are new every step
        features, extractor, shard_sets, num_classes = cached_features(cfg, dist, splits=("val",),
                                                                       random_init=random_init)
        samples = shard_sets["train"].samples or cfg.data.train_samples
        if not samples:
            raise ConfigError("linear.augment needs the number of training samples: shards with an index, "
                              "or data.train_samples")
        total = total_steps(samples, s, dist)
        grid = fit_grid(augmented_batches(extractor, shard_sets["train"].urls, cfg, dist), total,
                        {k: v.shape[1] for k, v in features["val"].variants.items()}, num_classes, s, dist,
                        cfg.run.seed)
        result = report(grid, features["val"], s, dist, total)
    else:
        features, _, _, num_classes = cached_features(cfg, dist, random_init=random_init)
        result = train_heads(features["train"], features["val"], num_classes, s, dist, cfg.run.seed)
    result["pretrained"] = cfg.pretrained
    if dist.is_main:
        path = write_report(result, cfg.run.dir, "linear")
        best = result["best"]
        print(f"linear probe: best {best} top1 {result['best_top1']:.2f} "
              f"top5 {result['heads'][best]['top5']:.2f} ({len(result['heads'])} heads; report {path})")
    return result
