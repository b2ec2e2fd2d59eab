"""Linear probe and kNN on 2 processes through the launcher, as a user runs them after the demo."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from finetune.config import KnnConfig
from finetune.features import FeatureCache, Features
from finetune.knn import accuracy, classify
from pretrain.dist import DistEnv
from pretrain.export import export_backbone
from tests.conftest import run_module

KWARGS = {"img_size": 32, "num_classes": 10, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2,
          "mlp_ratio": 2.0}
PROBE = ["data.prepare=none", "data.workers=0", "run.threads=1", "features.blocks=[1,2]"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A vitscale export (weights + backbone.json) of a tiny ViT."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **KWARGS)
    out = tmp_path_factory.mktemp("pretrained") / "export"
    export_backbone(model.state_dict(), out, "vit_tiny_patch16_224", KWARGS)
    return out


def gathered(cache_dir, split: str, world: int, stamp: str) -> Features:
    parts = [FeatureCache(cache_dir, DistEnv(rank=r, world_size=world), stamp).read(split) for r in range(world)]
    return Features({k: torch.cat([p.variants[k] for p in parts]) for k in parts[0].variants},
                    torch.cat([p.labels for p in parts]))


def test_knn_on_two_processes_equals_one_process_on_the_same_features(export_dir, digits_dir, tmp_path):
    run_dir = tmp_path / "knn"
    run_module("launch", "local", "--nproc", "2", "--", "finetune", "knn", "configs/finetune/knn_demo.yaml",
               f"pretrained={export_dir}", f"run.dir={run_dir}", f"data.train={digits_dir}", f"data.val={digits_dir}",
               "knn.ks=[10,20]", *PROBE)
    report = json.loads((run_dir / "knn.json").read_text())
    assert report["val_samples"] == 359 and len(report["heads"]) == 8
    files = sorted(p.name for p in (run_dir / "features").iterdir())
    assert files == [f"{s}-{r:03d}-of-002.safetensors" for s in ("train", "val") for r in (0, 1)]
    from safetensors import safe_open

    with safe_open(str(run_dir / "features" / files[0]), "pt") as f:
        stamp = f.metadata()["fingerprint"]
    train, val = gathered(run_dir / "features", "train", 2, stamp), gathered(run_dir / "features", "val", 2, stamp)
    assert (len(train), len(val)) == (1438, 359)  # the ranks' shares cover each split once
    cfg = KnnConfig()
    for variant in ("cls1", "cls2_avg"):
        ranked = classify(train, val, variant, 10, [10, 20], cfg.knn.temperature, DistEnv())
        for k in (10, 20):
            assert report["heads"][f"{variant}_k{k}"] == accuracy(ranked[k], val.labels)


def test_linear_on_two_processes_reports_every_head(export_dir, digits_dir, tmp_path):
    run_dir = tmp_path / "linear"
    result = run_module("launch", "local", "--nproc", "2", "--", "finetune", "linear", "configs/finetune/linear_demo.yaml",
                        f"pretrained={export_dir}", f"run.dir={run_dir}", f"data.train={digits_dir}",
                        f"data.val={digits_dir}", "linear.epochs=10", "linear.lrs=[0.01,1.0]", *PROBE)
    report = json.loads((run_dir / "linear.json").read_text())
    assert len(report["heads"]) == 8 and report["global_batch"] == 128
    assert report["best_top1"] == max(h["top1"] for h in report["heads"].values())
    assert report["best_top1"] > 30, report  # chance is 10
    assert f"best {report['best']}" in result.stdout
    assert list((run_dir / "tb").iterdir())
