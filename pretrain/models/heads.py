"""Heads on top of a backbone's pooled features: DINO's projection head and MoBY's MLPs."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from pretrain.dist import all_reduce_differentiable


class WeightNormLinear(nn.Module):
    """``y = x W^T`` with ``W = g * V / ||V||`` per output row (Salimans & Kingma 2016), no bias.

    Written out rather than through torch's parametrizations so that ZeRO-3 sees two plain
    parameters of this module. ``fixed_norm`` freezes ``g`` at 1 (DINO's ``norm_last_layer``).
    """

    def __init__(self, in_dim: int, out_dim: int, fixed_norm: bool) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        # nn.Linear's default init, as DINO's head gets: rows of norm about 1/sqrt(3) whatever
        # ``in_dim``. Only V's direction counts, and an optimizer step turns a row by about
        # lr * sqrt(in_dim) / ||row||: rows as short as trunc_normal(0.02) makes them (0.11 for a
        # 32-d bottleneck) turn the prototypes several times faster than the paper's head does.
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fixed_norm)

    def weight(self, detach: bool = False) -> torch.Tensor:
        v, g = (self.weight_v.detach(), self.weight_g.detach()) if detach else (self.weight_v, self.weight_g)
        return g * v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        return F.linear(x, self.weight(detach=frozen).to(x.dtype))


class DINOHead(nn.Module):
    """MLP (``layers`` linear layers, GELU) -> bottleneck -> L2 normalize -> weight-normalized
    linear to ``out_dim`` prototypes (Caron et al. 2021)."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3, norm_last_layer: bool = True) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        blocks: list[nn.Module] = []
        for i in range(layers):
            blocks.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                blocks.append(nn.GELU())
        self.mlp = nn.Sequential(*blocks)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_norm=norm_last_layer)

    def forward(self, x: torch.Tensor, freeze_last_layer: bool = False) -> torch.Tensor:
        """``freeze_last_layer``: no gradient reaches the prototypes (DINO's first epoch)."""
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return self.last_layer(x, frozen=freeze_last_layer)


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over the global batch of every rank, computed in fp32 whatever the dtype of the
    weights (DeepSpeed keeps the running statistics in fp32 next to bf16 weights).

    torch's SyncBatchNorm runs on GPUs only; this one syncs the per-feature sums with one
    autograd-aware all-reduce, so it runs the same on CPU (gloo) and GPUs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, x = x.dtype, x.float()
        if self.training:
            stats = torch.cat([x.sum(0), (x * x).sum(0), x.new_full((1,), float(len(x)))])
            stats = all_reduce_differentiable(stats)
            dim = x.shape[1]
            count = stats[-1]
            mean = stats[:dim] / count
            var = (stats[dim:2 * dim] / count - mean * mean).clamp_min(0.0)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp_min(1.0), self.momentum)
                self.num_batches_tracked.add_(1)
        else:
            mean, var = self.running_mean, self.running_var
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return (y * self.weight.float() + self.bias.float()).to(dtype)


class MoBYMLP(nn.Module):
    """MoBY's projector and predictor: (Linear -> BN -> ReLU) x (layers - 1) -> Linear."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256, layers: int = 2) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers - 1):
            blocks += [nn.Linear(dim, hidden_dim), SyncBatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            dim = hidden_dim
        blocks.append(nn.Linear(dim, out_dim))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
