"""MoBY (Xie et al. 2021): MoCo v2's key queues with BYOL's predictor and momentum target.

Online: encoder -> projector -> predictor; target: EMA of encoder and projector (see
pretrain.models.teacher), without drop path. Two views per image; each online query is contrasted
with the target's key of the other view (positive) and a queue of earlier keys of that view
(negatives), at temperature ``temperature``; the two directions are summed. The queues hold
L2-normalized keys from every rank.

Batch norm in the MLPs normalizes over the global batch (pretrain.models.heads.SyncBatchNorm1d).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from pretrain.data.views import TwoView
from pretrain.models.heads import MoBYMLP
from pretrain.objectives import base, dino, ssl
from pretrain.objectives.monitors import embedding_std
from pretrain.sections import ConfigError


@dataclass
class Config(ssl.Config):
    name: str = "moby"
    scale: tuple[float, float] = (0.08, 1.0)  # of both views
    # BYOL's asymmetric photometric augmentation: (first view, second view).
    blur: tuple[float, float] = (1.0, 0.1)
    solarize: tuple[float, float] = (0.0, 0.2)
    proj_dim: int = 256
    hidden_dim: int = 4096
    queue_size: int = 4096
    temperature: float = 0.2
    momentum: float = 0.99  # target EMA momentum, cosine to 1
    export: Literal["online", "target"] = "online"

    def validate(self) -> None:
        super().validate()
        self.require_positive("proj_dim", "hidden_dim", "queue_size", "temperature")
        self.require_at_most(dino.MAX_HEAD_DIM, "proj_dim", "hidden_dim")
        self.require_scales("scale")
        self.require_fractions("blur[0]", "blur[1]", "solarize[0]", "solarize[1]")

    def validate_run(self, cfg) -> None:
        # Whole global batches enter the queue, so the write position wraps around exactly.
        keys_per_step = cfg.data.batch_size  # per rank; times the world size, checked at start-up
        if self.queue_size % keys_per_step:
            raise ConfigError(f"objective.queue_size={self.queue_size}: must be a multiple of the global batch "
                              f"(data.batch_size={cfg.data.batch_size} times the number of processes)")


def contrastive_loss(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of normalized ``query`` (B x D) against its ``key`` (B x D) and the ``queue`` (D x K)."""
    positive = (query * key).sum(dim=1, keepdim=True)
    negative = query @ queue
    logits = torch.cat([positive, negative], dim=1).float() / temperature
    return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))


def moby_loss(q1, q2, k1, k2, queue1, queue2, temperature: float) -> torch.Tensor:
    """Symmetric: view 1's queries against view 2's keys and queue, and the other way round."""
    return contrastive_loss(q1, k2, queue2, temperature) + contrastive_loss(q2, k1, queue1, temperature)


class Objective(ssl.Objective):
    student_name, teacher_name, backbone_name = "online", "target", "encoder"
    teacher_export = "target"

    def __init__(self, cfg, ctx: base.RunContext) -> None:
        super().__init__(cfg, ctx)
        o = cfg.objective
        world = ctx.dist.world_size
        if o.queue_size % (cfg.data.batch_size * world):
            raise ConfigError(f"objective.queue_size={o.queue_size}: must be a multiple of the global batch "
                              f"({cfg.data.batch_size} x {world} processes)")
        self.build_networks(lambda in_dim: {"projector": lambda: MoBYMLP(in_dim, o.hidden_dim, o.proj_dim)},
                            {"predictor": lambda: MoBYMLP(o.proj_dim, o.hidden_dim, o.proj_dim)})
        for name in ("queue1", "queue2"):
            self.register_buffer(name, F.normalize(torch.randn(o.proj_dim, o.queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.photometric = self.photometric_per_crop(o.blur, o.solarize)

    def train_view(self):
        o = self.cfg.objective
        return TwoView(self.cfg.data.image_size, o.scale, o.hflip, o.interpolation)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        net = self.online
        return F.normalize(net["predictor"](net["projector"](net["encoder"](x))).float(), dim=1)

    @torch.no_grad()
    def _key(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.target("projector", self.target("encoder", x)).float(), dim=1)

    def micro_step(self, batch: dict):
        o = self.cfg.objective
        views = batch["views"]
        x1, x2 = self._inputs(views[:, 0], self.photometric[0]), self._inputs(views[:, 1], self.photometric[1])
        q1, q2 = self._query(x1), self._query(x2)
        k1, k2 = self._key(x1), self._key(x2)
        loss = moby_loss(q1, q2, k1, k2, self.queue1.clone(), self.queue2.clone(), o.temperature)
        metrics = {"embedding_std": embedding_std(q1), "key_std": embedding_std(k1),
                   "positive_sim": (q1.detach() * k2).sum(1).mean()}
        self._enqueue(k1, k2)
        return loss, metrics

    @torch.no_grad()
    def _enqueue(self, k1: torch.Tensor, k2: torch.Tensor) -> None:
        keys = torch.stack([k1, k2])
        if self.ctx.dist.world_size > 1:
            gathered = self.ctx.dist.all_gather_cat(keys)
            keys = gathered.view(-1, *keys.shape).transpose(0, 1).flatten(1, 2)  # (2, world * B, D), rank-major
        n = keys.shape[1]
        # The write position stays a tensor (reading it on the host would wait for the device); whole
        # global batches fill the queue, so the columns never run past its end.
        columns = self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)
        self.queue1.index_copy_(1, columns, keys[0].T.to(self.queue1.dtype))
        self.queue2.index_copy_(1, columns, keys[1].T.to(self.queue2.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % self.queue1.shape[1])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # The queues hold every rank's keys, so they need no re-sharding on a resume with another
        # number of processes; but when the global batch changed, the write position may no longer
        # be a multiple of it. Rolling the queues puts the oldest keys first (the loss is the same:
        # the negatives are a set) and the write position at 0.
        per_step = self.cfg.data.batch_size * self.ctx.dist.world_size
        ptr = int(self.queue_ptr)
        if ptr % per_step:
            for queue in (self.queue1, self.queue2):
                queue.copy_(torch.roll(queue, -ptr, dims=1))
            self.queue_ptr.zero_()

    def collapse_limits(self) -> tuple[dict[str, float], dict[str, float]]:
        o = self.cfg.objective
        return {"embedding_std": o.collapse_std, "key_std": o.collapse_std}, {}
