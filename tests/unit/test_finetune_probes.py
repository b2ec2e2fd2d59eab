"""Linear probe and kNN on cached frozen features of scikit-learn's digits, against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestNeighbors

from finetune.config import LinearConfig, LinearSection
from finetune.features import FeatureCache, FeatureExtractor, Features, compute
from finetune.knn import accuracy, classify
from finetune.linear import augmented_batches, fit_grid, report, train_heads
from pretrain.config import ModelConfig
from pretrain.data.sources import resolve
from pretrain.dist import DistEnv
from pretrain.models.backbone import create_backbone

TINY = ModelConfig(name="vit_tiny_patch16_224", drop_path=0.0,
                   kwargs={"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0})


def probe_config(digits_dir) -> LinearConfig:
    cfg = LinearConfig(pretrained="unused")
    cfg.data.train = cfg.data.val = str(digits_dir)
    cfg.data.image_size, cfg.data.workers, cfg.data.mean, cfg.data.std = 32, 0, (0.5,) * 3, (0.5,) * 3
    cfg.features.crop_pct, cfg.features.blocks, cfg.features.avgpool = 1.0, [1, 2], [False, True]
    return cfg


@pytest.fixture(scope="module")
def extractor(digits_dir) -> FeatureExtractor:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return FeatureExtractor(create_backbone(TINY, 32, 10), probe_config(digits_dir).features)


@pytest.fixture(scope="module")
def digits_features(digits_dir, extractor) -> tuple[Features, Features]:
    """Frozen features of a (randomly initialized) tiny ViT, through the probe's own extraction."""
    cfg = probe_config(digits_dir)
    assert extractor.variant_names == ["cls1", "cls1_avg", "cls2", "cls2_avg"]
    train = compute(extractor, resolve(str(digits_dir), "train").urls, cfg, DistEnv())
    val = compute(extractor, resolve(str(digits_dir), "val").urls, cfg, DistEnv())
    return train, val


def test_features_cover_each_split_once_with_their_labels(digits_features):
    train, val = digits_features
    assert (len(train), len(val)) == (1438, 359)
    assert train.variants["cls2_avg"].shape == (1438, 96)  # two CLS tokens and the mean patch token
    # The last block's CLS token (normed) is the model's own pre-logits feature.
    assert torch.equal(train.variants["cls2"][:, 32:], train.variants["cls1"])
    assert sorted(torch.bincount(val.labels).tolist())[0] > 25  # all ten digits in val


def test_cache_round_trip_and_fingerprint(digits_features, tmp_path):
    train, _ = digits_features
    cache = FeatureCache(tmp_path, DistEnv(), "abc")
    cache.write("train", train, torch.float16)
    back = cache.read("train")
    assert torch.equal(back.labels, train.labels)
    torch.testing.assert_close(back.variants["cls1"], train.variants["cls1"], atol=2e-3, rtol=2e-3)
    assert FeatureCache(tmp_path, DistEnv(), "other").read("train") is None  # made from something else


def test_linear_probe_matches_logistic_regression(digits_features):
    train, val = digits_features
    variant = "cls1_avg"
    x, y = train.variants[variant].numpy(), train.labels.numpy()
    reference = LogisticRegression(C=1.0, max_iter=5000).fit(x, y)
    expected = 100.0 * (reference.predict(val.variants[variant].numpy()) == val.labels.numpy()).mean()
    # The same L2 penalty as scikit-learn's C=1 (its loss is a sum, ours a mean): weight decay 1/(C n).
    section = LinearSection(lrs=[0.3, 1.0], epochs=100, batch_size=64, base_batch=64, weight_decay=1.0 / len(y))
    only = Features({variant: train.variants[variant]}, train.labels)
    report = train_heads(only, Features({variant: val.variants[variant]}, val.labels), 10, section, DistEnv())
    assert expected > 30  # a real signal to match (chance is 10)
    # Two solvers of one convex problem (mini-batch SGD here, L-BFGS there) part only on samples near
    # the decision boundary: 2 points is 7 of the 359; a broken head misses by tens.
    for name, result in report["heads"].items():
        assert abs(result["top1"] - expected) <= 2.0, (name, result, expected)
    assert report["best"] in report["heads"] and report["val_samples"] == len(val)


def test_linear_grid_trains_every_variant_and_lr(digits_features):
    train, val = digits_features
    section = LinearSection(lrs=[1e-4, 1.0], epochs=3, batch_size=64, base_batch=64, batchnorm=True)
    report = train_heads(train, val, 10, section, DistEnv())
    assert len(report["heads"]) == 8
    # A tiny lr barely moves from the initial heads; the right one learns.
    assert report["heads"]["cls1_avg_lr1"]["top1"] > report["heads"]["cls1_avg_lr0.0001"]["top1"] + 20
    assert report["best"].endswith("lr1")


def test_augmented_crops_train_the_grid(digits_dir, extractor, digits_features):
    """DINO's protocol: features of new random crops at every step, the same heads and evaluation."""
    cfg = probe_config(digits_dir)
    cfg.linear = LinearSection(lrs=[1.0], batch_size=64, base_batch=64, crop_scale=(0.8, 1.0), batchnorm=True)
    batches = augmented_batches(extractor, resolve(str(digits_dir), "train").urls, cfg, DistEnv())
    first, labels = next(batches)
    assert first["cls1"].shape == (64, 32) and labels.shape == (64,)
    again, _ = next(augmented_batches(extractor, resolve(str(digits_dir), "train").urls, cfg, DistEnv()))
    assert torch.equal(first["cls1"], again["cls1"])  # crops are seeded: a rerun sees the same stream
    dims = {k: v.shape[1] for k, v in digits_features[1].variants.items()}
    grid = fit_grid(batches, 40, dims, 10, cfg.linear, DistEnv())
    result = report(grid, digits_features[1], cfg.linear, DistEnv(), 40)
    assert result["best_top1"] > 15, result  # chance is 10 (about 1.6 points of noise on 359 samples)


def dino_knn(train_x, train_y, test_x, k, temperature, num_classes, rounding=1e-5):
    """Nearest neighbours by scikit-learn, then DINO's weighting of their votes (float64 numpy).

    Returns (votes, slack): the class votes, and per row how far a float32 computation may move
    the votes of two classes apart: a relative ``rounding`` of the winning vote, plus the weights
    of the neighbours whose similarity is within ``rounding`` of the k-th (float32 may rank them
    either side of the cut)."""
    neighbours = NearestNeighbors(n_neighbors=k + 5, metric="cosine").fit(train_x)
    distances, index = neighbours.kneighbors(test_x)
    sims = 1.0 - distances
    weights = np.exp(sims / temperature)
    votes = np.zeros((len(test_x), num_classes))
    for row in range(len(test_x)):
        np.add.at(votes[row], train_y[index[row, :k]], weights[row, :k])
    at_the_cut = np.abs(sims - sims[:, k - 1:k]) <= rounding
    slack = rounding * votes.max(axis=1) + 2 * (weights * at_the_cut).sum(axis=1)
    return votes, slack


def test_knn_matches_nearest_neighbors_with_dino_weighting(digits_features):
    train, val = digits_features
    variant = "cls2_avg"
    ranked = classify(train, val, variant, 10, [10, 20, 100], 0.07, DistEnv(), chunk=100)
    labels = val.labels.numpy()
    for k in (10, 20, 100):
        votes, slack = dino_knn(train.variants[variant].double().numpy(), train.labels.numpy(),
                                val.variants[variant].double().numpy(), k, 0.07, 10)
        chosen, best = ranked[k][:, 0].numpy(), votes.argmax(axis=1)
        # float32 against float64: a different winner only where the two votes are equal up to rounding.
        rows = np.arange(len(votes))
        shortfall = votes[rows, best] - votes[rows, chosen]
        flipped = np.flatnonzero(chosen != best)
        assert (shortfall[flipped] <= slack[flipped]).all(), (k, flipped, shortfall[flipped], slack[flipped])
        assert len(flipped) <= 2, (k, flipped)  # near-ties are rare; more means a real disagreement
        top1 = accuracy(ranked[k], val.labels)["top1"]
        assert top1 == pytest.approx(100.0 * (chosen == labels).mean())
        assert abs(top1 - 100.0 * (best == labels).mean()) <= 100.0 * len(flipped) / len(labels) + 1e-9
    assert accuracy(ranked[20], val.labels)["top1"] > 30


def test_knn_rejects_k_larger_than_the_training_set(digits_features):
    train, val = digits_features
    small = Features({k: v[:5] for k, v in train.variants.items()}, train.labels[:5])
    with pytest.raises(ValueError, match="k=10 is more than the 5 training samples"):
        classify(small, val, "cls1", 10, [10], 0.07, DistEnv())


def test_variants_are_the_models_own_features():
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    vit = create_backbone(TINY, 32, 10).eval()
    cfg = LinearConfig().features
    cfg.blocks, cfg.avgpool, cfg.stages = [1, 2], [False, True], [1, 2]
    out = FeatureExtractor(vit, cfg)(images)
    tokens = vit.forward_features(images)  # the final norm applied
    torch.testing.assert_close(out["cls1"], tokens[:, 0])
    torch.testing.assert_close(out["cls1_avg"], torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1))
    swin = create_backbone(ModelConfig(name="swin_tiny_patch4_window7_224", drop_path=0.0, kwargs={
        "patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2]}), 32, 10).eval()
    extractor = FeatureExtractor(swin, cfg)
    assert extractor.variant_names == ["avg1", "avg2"]
    out = extractor(images)
    pooled = swin.forward_head(swin.forward_features(images), pre_logits=True)
    torch.testing.assert_close(out["avg1"], pooled)
    assert out["avg2"].shape == (3, 16 + 32) and torch.equal(out["avg2"][:, 16:], out["avg1"])
