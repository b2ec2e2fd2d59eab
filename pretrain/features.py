"""Features of a frozen timm backbone: the one extractor behind the demo's quick probe (pretrain.probe)
and the fine-tuning stages' linear probe and kNN (finetune.features, which caches them across ranks).

Variants. ``pooled``: what the model's classifier reads (timm's pre-logits: the model's own pooling
and norm). ViT: ``cls{n}`` is the concatenated CLS tokens of the last n blocks, each through the
final norm, ``cls{n}_avg`` adds the mean patch token of the last block (DINO's linear protocol).
Swin: ``avg{n}`` is the spatial mean of each of the last n stages (``avg1``: the usual pooled feature).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from pretrain.config import ConfigError
from pretrain.data.transforms import normalize

POOLED = "pooled"


@dataclass
class Features:
    """Features of some samples (one rank's share of a split, or all of it): variant name -> (N, D), and labels (N,)."""

    variants: dict[str, torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


class FeatureExtractor(nn.Module):
    """Images (normalized) -> {variant: features}, from a frozen timm model.

    ``cfg``: which ViT or Swin variants, as finetune's ``features`` section names them (``blocks``,
    ``avgpool``, ``stages``); None: only ``pooled``, from any timm model.
    """

    def __init__(self, model: nn.Module, cfg=None) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.vit = isinstance(model, VisionTransformer)
        if cfg is None:
            self.depth, self.names = 0, []
        elif self.vit:
            if model.cls_token is None:
                raise ConfigError(f"{type(model).__name__} without a CLS token (class_token=False): the ViT "
                                  f"features (features.blocks: the CLS tokens of the last blocks) need one")
            self.depth = max(cfg.blocks)
            if self.depth > len(model.blocks):
                raise ConfigError(f"features.blocks={cfg.blocks}: the model has only {len(model.blocks)} blocks")
            self.names = [(n, a) for n in cfg.blocks for a in dict.fromkeys(cfg.avgpool)]
        elif isinstance(model, SwinTransformer):
            self.depth = max(cfg.stages)
            if self.depth > len(model.layers):
                raise ConfigError(f"features.stages={cfg.stages}: the model has only {len(model.layers)} stages")
            self.names = [(n, None) for n in cfg.stages]
        else:
            raise ValueError(f"{type(model).__name__}: features are defined for timm ViT and Swin models")

    @property
    def variant_names(self) -> list[str]:
        if not self.names:
            return [POOLED]
        if self.vit:
            return [f"cls{n}" + ("_avg" if avg else "") for n, avg in self.names]
        return [f"avg{n}" for n, _ in self.names]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.names:
            return {POOLED: self.model.forward_head(self.model.forward_features(images), pre_logits=True).float()}
        if self.vit:
            layers = self.model.forward_intermediates(images, indices=self.depth, return_prefix_tokens=True,
                                                      norm=True, output_fmt="NLC", intermediates_only=True)
            cls = [prefix[:, 0] for _, prefix in layers]
            mean_patch = layers[-1][0].mean(dim=1)
            parts = [cls[-n:] + ([mean_patch] if avg else []) for n, avg in self.names]
        else:
            stages = self.model.forward_intermediates(images, indices=self.depth, norm=True, output_fmt="NCHW",
                                                      intermediates_only=True)
            pooled = [s.mean(dim=(2, 3)) for s in stages]
            parts = [pooled[-n:] for n, _ in self.names]
        return {name: torch.cat(p, dim=1).float() for name, p in zip(self.variant_names, parts)}

    def of_batch(self, images: torch.Tensor, mean, std, device: torch.device) -> dict[str, torch.Tensor]:
        """The features of a data batch's uint8 images: normalized on ``device``, in bf16 on GPUs."""
        images = normalize(images.to(device, non_blocking=True), mean, std, torch.float32)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return self(images)

    def dims(self) -> dict[str, int]:
        """Each variant's width (from one blank image at the model's size)."""
        probe = torch.zeros(1, 3, *self.model.patch_embed.img_size, device=next(self.parameters()).device)
        return {name: value.shape[1] for name, value in self(probe).items()}


@torch.no_grad()
def extract(extractor: FeatureExtractor, batches: Iterable[dict], mean, std,
            device: torch.device = torch.device("cpu")) -> Features:
    """The features (on the CPU) and labels of every sample ``batches`` yields (data batches: ``image``,
    ``label``), in order; empty tensors of the right width when there are none."""
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in extractor.variant_names}
    labels = []
    for batch in batches:
        for name, value in extractor.of_batch(batch["image"], mean, std, device).items():
            chunks[name].append(value.cpu())
        labels.append(batch["label"])
    if not labels:
        dims = extractor.dims()
        return Features({name: torch.zeros(0, dims[name]) for name in chunks}, torch.zeros(0, dtype=torch.long))
    return Features({name: torch.cat(v) for name, v in chunks.items()}, torch.cat(labels))
