"""Frozen features, computed once across ranks and cached on disk.

Each rank reads its own share of a split (the validation-style stream: every sample once, split
by rank and worker), runs the frozen backbone and writes ``{split}-{rank}-of-{world}.safetensors``
with one tensor per feature variant plus the labels. The files carry a fingerprint of what made
them (weights, model, image size, variants); a later run with the same fingerprint reuses them.
The variants (``cls{n}``, ``cls{n}_avg`` for ViT, ``avg{n}`` for Swin) are pretrain.features'.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from finetune.config import ProbeConfig
from pretrain.config import ConfigError, ModelConfig
from pretrain.data import shards, sources
from pretrain.data.stream import Loader, ShardDataset
from pretrain.data.transforms import EvalView
from pretrain.dist import DistEnv
from pretrain.features import FeatureExtractor, Features, extract
from pretrain.files import atomic_path

log = logging.getLogger(__name__)


def fingerprint(cfg: ProbeConfig, model_name: str, variants: list[str], random_init: bool = False) -> str:
    """What the cached features depend on; a change in any of it computes them again."""
    if random_init:
        stamp = f"random init, seed {cfg.run.seed}"
    else:
        source = Path(cfg.pretrained).expanduser().resolve()
        stamp = [(str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(_weight_files(source))]
    d, f = cfg.data, cfg.features
    described = {"weights": stamp, "key": cfg.checkpoint_key, "model": model_name, "variants": variants,
                 "image_size": d.image_size, "crop_pct": f.crop_pct, "interpolation": f.interpolation,
                 "mean": list(d.mean), "std": list(d.std), "train": d.train, "val": d.val, "dtype": f.dtype}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _weight_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    return [p for p in source.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".pt", ".json", ".yaml")
            or p.name == "latest"]


class FeatureCache:
    def __init__(self, directory: str | Path, dist: DistEnv, stamp: str) -> None:
        self.directory = Path(directory)
        self.dist = dist
        self.stamp = stamp

    def path(self, split: str, rank: int | None = None) -> Path:
        rank = self.dist.rank if rank is None else rank
        return self.directory / f"{split}-{rank:03d}-of-{self.dist.world_size:03d}.safetensors"

    def read(self, split: str, rank: int | None = None) -> Features | None:
        """A rank's cached share, or None when it is absent or was made from something else."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = self.path(split, rank)
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("fingerprint") != self.stamp:
                return None
        tensors = load_file(str(path))
        labels = tensors.pop("__labels__")
        return Features({k: v.float() for k, v in tensors.items()}, labels)

    def write(self, split: str, features: Features, dtype: torch.dtype) -> None:
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(split)
        tensors = {k: v.to(dtype).contiguous() for k, v in features.variants.items()}
        with atomic_path(path) as tmp:
            save_file({**tensors, "__labels__": features.labels}, str(tmp), metadata={"fingerprint": self.stamp})


def check_features(cfg: ProbeConfig, model: ModelConfig) -> None:
    """ConfigError, before any process starts, when ``model`` (the one ``pretrained`` describes) cannot
    give the features ``cfg`` asks for: built on the meta device, as the extractor would take it."""
    from pretrain.models.backbone import create_backbone, on_meta_device

    try:
        FeatureExtractor(on_meta_device(lambda: create_backbone(model, cfg.data.image_size, 1)), cfg.features)
    except ConfigError as e:
        raise ConfigError(f"pretrained={cfg.pretrained!r} ({model.name}, {model.kwargs}): {e}") from None


def compute(extractor: FeatureExtractor, urls: list[str], cfg: ProbeConfig, dist: DistEnv) -> Features:
    """This rank's share of ``urls`` through the frozen backbone."""
    d, f = cfg.data, cfg.features
    view = EvalView(d.image_size, f.crop_pct, f.interpolation)
    dataset = ShardDataset(urls, view, d.val_batch_size or d.batch_size, rank=dist.rank,
                           world_size=dist.world_size, seed=cfg.run.seed, train=False)
    loader = Loader(dataset, d.workers, pin_memory=d.pin_memory and dist.device.type == "cuda")
    features = extract(extractor, loader, d.mean, d.std, dist.device)
    if loader.skipped:
        log.warning("rank %d skipped samples: %s", dist.rank, dict(loader.skipped))
    return features


def resolve_splits(cfg: ProbeConfig) -> dict[str, shards.ShardSet]:
    found = {"train": sources.resolve(cfg.data.train, "train"), "val": sources.resolve(cfg.data.val, "val")}
    shards.check_train_and_val(found["train"], found["val"], cfg.data.train, cfg.data.val)
    return found


def cached_features(cfg: ProbeConfig, dist: DistEnv, splits: tuple[str, ...] = ("train", "val"),
                    random_init: bool = False
                    ) -> tuple[dict[str, Features], FeatureExtractor, dict[str, shards.ShardSet], int]:
    """({split: this rank's features}, the extractor, the splits' shards, number of classes),
    computing what is not cached. ``random_init``: the model ``pretrained`` describes, with its
    initial weights for ``run.seed`` instead of the stored ones (the reference a probe is read against)."""
    from finetune import weights
    from pretrain.models.backbone import create_backbone

    shard_sets = resolve_splits(cfg)
    model_cfg = weights.resolve_model(cfg.model, cfg.pretrained)
    num_classes = cfg.data.num_classes or len(shard_sets["train"].classes or [])
    if not num_classes:
        raise ValueError("data.num_classes is required when the shards have no index naming the classes")
    if random_init:
        torch.manual_seed(cfg.run.seed)  # the same weights on every rank
    model = create_backbone(model_cfg, cfg.data.image_size, num_classes)
    if random_init:
        if dist.is_main:
            log.info("features of %s at random init (seed %d)", model_cfg.name, cfg.run.seed)
    else:
        pretrained = weights.load_into(model, cfg.pretrained, cfg.checkpoint_key, head="new")
        if dist.is_main:
            log.info("features from %s (%s), model %s", pretrained.source, pretrained.layout, model_cfg.name)
    extractor = FeatureExtractor(model, cfg.features).to(dist.device)
    cache = FeatureCache(cfg.features.cache or Path(cfg.run.dir) / "features", dist,
                         fingerprint(cfg, model_cfg.name, extractor.variant_names, random_init))
    dtype = getattr(torch, cfg.features.dtype)
    out = {}
    for split in splits:
        found = cache.read(split)
        if found is None:
            found = compute(extractor, shard_sets[split].urls, cfg, dist)
            cache.write(split, found, dtype)
            found = cache.read(split)  # what later runs will read (rounded to the cache's dtype)
        out[split] = found
    dist.barrier()
    return out, extractor, shard_sets, num_classes
