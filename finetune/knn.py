"""Weighted k-nearest-neighbour classification on L2-normalized frozen features (DINO's protocol).

Each test feature's k most cosine-similar training features vote for their class with weight
``exp(similarity / T)``; the class with the largest total wins. The training features stay sharded:
every rank finds the nearest neighbours among its own share, chunk by chunk of the (gathered) test
features, and the ranks' candidates are merged into the global top k, so millions of training
features never sit in one process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.config import KnnConfig
from finetune.features import Features
from pretrain.dist import DistEnv


def gather_rows(tensor: torch.Tensor, dist: DistEnv) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (ranks may hold different numbers of rows)."""
    if dist.world_size == 1:
        return tensor
    counts = [int(c.item()) for c in dist.all_gather_list(torch.tensor([len(tensor)], device=tensor.device))]
    padded = torch.zeros((max(counts), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[:len(tensor)] = tensor
    return torch.cat([part[:count] for part, count in zip(dist.all_gather_list(padded), counts)])


def nearest(test: torch.Tensor, train: torch.Tensor, train_labels: torch.Tensor, k: int,
            dist: DistEnv) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, labels) of each test row's ``k`` nearest training rows over all ranks, sorted
    by decreasing similarity. Rows must be L2-normalized. A collective."""
    local_k = min(k, len(train))
    if local_k:
        sims, index = (test @ train.T).topk(local_k, dim=1)
        labels = train_labels[index]
    else:
        sims = test.new_zeros(len(test), 0)
        labels = train_labels.new_zeros(len(test), 0)
    if dist.world_size > 1:  # pad to k so every rank contributes the same shape
        pad = k - local_k
        sims = torch.cat([sims, sims.new_full((len(test), pad), float("-inf"))], dim=1)
        labels = torch.cat([labels, labels.new_zeros(len(test), pad)], dim=1)
        sims, order = torch.cat(dist.all_gather_list(sims), dim=1).topk(k, dim=1)
        labels = torch.cat(dist.all_gather_list(labels), dim=1).gather(1, order)
    return sims, labels


def vote(sims: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """Class scores: the sum over neighbours of ``exp(sim / T)`` for the neighbour's class."""
    weights = (sims / temperature).exp()
    return torch.zeros(len(sims), num_classes, dtype=weights.dtype, device=sims.device).scatter_add_(
        1, labels, weights)


@torch.no_grad()
def classify(train: Features, test: Features, variant: str, num_classes: int, ks: list[int], temperature: float,
             dist: DistEnv, chunk: int = 1024) -> dict[int, torch.Tensor]:
    """{k: predicted classes ranked (N, min(5, C))} for every test row of every rank (a collective).

    ``train`` and ``test`` are this rank's shares; the test rows come back in rank order.
    """
    device = dist.device
    train_x = F.normalize(train.variants[variant].to(device).float(), dim=1)
    train_y = train.labels.to(device)
    test_x = F.normalize(gather_rows(test.variants[variant].to(device).float(), dist), dim=1)
    k_max = max(ks)
    total = int(dist.all_reduce(torch.tensor(float(len(train_x)), device=device)).item())
    if total < k_max:
        raise ValueError(f"knn.ks={ks}: k={k_max} is more than the {total} training samples")
    ranked: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, len(test_x), chunk):
        sims, labels = nearest(test_x[start:start + chunk], train_x, train_y, k_max, dist)
        for k in ks:
            scores = vote(sims[:, :k], labels[:, :k], num_classes, temperature)
            ranked[k].append(scores.topk(min(5, num_classes), dim=1).indices.cpu())
    return {k: torch.cat(v) if v else torch.zeros(0, min(5, num_classes), dtype=torch.long)
            for k, v in ranked.items()}


def accuracy(ranked: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    hits = ranked.eq(labels[:, None])
    n = max(len(labels), 1)
    return {"top1": 100.0 * hits[:, 0].sum().item() / n, "top5": 100.0 * hits.any(dim=1).sum().item() / n}


def run(cfg: KnnConfig, dist: DistEnv, random_init: bool = False) -> dict:
    from finetune.features import cached_features
    from finetune.linear import write_report

    features, extractor, _, num_classes = cached_features(cfg, dist, random_init=random_init)
    test_labels = gather_rows(features["val"].labels.to(dist.device), dist).cpu()
    heads = {}
    for variant in extractor.variant_names:
        ranked = classify(features["train"], features["val"], variant, num_classes, cfg.knn.ks,
                          cfg.knn.temperature, dist, cfg.knn.chunk)
        for k, predictions in ranked.items():
            heads[f"{variant}_k{k}"] = accuracy(predictions, test_labels)
    best = max(heads, key=lambda name: heads[name]["top1"])
    report = {"heads": heads, "best": best, "best_top1": heads[best]["top1"], "temperature": cfg.knn.temperature,
              "val_samples": len(test_labels), "pretrained": cfg.pretrained}
    if dist.is_main:
        path = write_report(report, cfg.run.dir, "knn")
        print(f"kNN: best {best} top1 {heads[best]['top1']:.2f} top5 {heads[best]['top5']:.2f} (report {path})")
    return report
