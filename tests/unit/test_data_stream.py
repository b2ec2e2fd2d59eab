"""The training and validation streams over 2 ranks x 2 workers: splits, order, resume, skip rate.

Both ranks live in this process (a ShardDataset is told its rank); the DataLoader workers are real
processes. tests/integration/test_data_distributed.py repeats the central checks with 2 processes.
Splitting, order and resume are the stream's, whatever the shards' format: those tests run on every
format (``fmt``; Parquet shards in row groups of 3 samples).
"""

from __future__ import annotations

import multiprocessing
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch

from pretrain.data.shards import ShardError
from pretrain.data.sources import resolve
from pretrain.data.faults import SkipRateError
from pretrain.data.stream import Loader, ShardDataset
from pretrain.data.transforms import EvalView, SupervisedTrainView
from tests.helpers import KeyOnlyView
from tests.unit.data_samples import FORMATS, shard_number, write_bad_shards, write_counted_shards

COUNTS = [5, 9, 3, 8, 6, 7, 10]  # 48 samples, unequal shards
RANKS, WORKERS = 2, 2


def dataset(urls, rank, *, counts=None, train=True, batch_size=4, seed=0, view=None, **kw):
    return ShardDataset(urls, view or KeyOnlyView(), batch_size, rank=rank, world_size=RANKS, seed=seed,
                        train=train, counts=counts, **kw)


def all_keys(urls) -> list[str]:
    return [f"s{shard_number(url)}-{i}" for url in urls for i in range(COUNTS[shard_number(url)])]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("split", ["index", "whole_shards", "by_sample"])
def test_each_sample_once_per_epoch_across_ranks_and_workers(tmp_path, split, fmt):
    counts = COUNTS if split != "by_sample" else COUNTS[:3]  # 3 shards < 4 slots: split by sample
    urls = write_counted_shards(tmp_path, counts, fmt=fmt)
    shard_counts = counts if split == "index" else None
    orders = []
    for epoch in range(3):
        shares = {(rank, role): [s["__key__"] for s in
                                 dataset(urls, rank, counts=shard_counts).raw_samples(epoch, role, WORKERS)]
                  for rank in range(RANKS) for role in range(WORKERS)}
        seen = Counter(k for keys in shares.values() for k in keys)
        assert sorted(seen) == sorted(f"s{s}-{i}" for s, c in enumerate(counts) for i in range(c))
        assert set(seen.values()) == {1}, "a sample was read twice in one epoch"
        if split == "index":  # contiguous shares: no slot has more than one sample over another
            sizes = [len(keys) for keys in shares.values()]
            assert max(sizes) - min(sizes) <= 1, sizes
        orders.append([k for keys in shares.values() for k in keys])
    if split != "by_sample":  # (3 shards have only 6 orders; the Loader test covers that case)
        assert len({tuple(order) for order in orders}) == 3, "the shard order should change every epoch"


def consume(urls, rank, batches, *, seed=0, counts=COUNTS, workers=WORKERS, state=None, **kw):
    """(key batches, loader) for the first ``batches`` batches of one rank's training stream."""
    loader = Loader(dataset(urls, rank, counts=counts, seed=seed, shuffle_buffer=8, **kw), workers)
    if state is not None:
        loader.load_state_dict(state)
    return [b["__keys__"] for b in islice(iter(loader), batches)], loader


@pytest.mark.parametrize("fmt", FORMATS)
def test_epochs_equal_batches_order_and_seed(tmp_path, fmt):
    urls = write_counted_shards(tmp_path, COUNTS, fmt=fmt)
    # 48 samples / 4 slots = 12 per worker = 3 batches of 4: one epoch is 6 batches per rank.
    per_rank = {rank: consume(urls, rank, 12)[0] for rank in range(RANKS)}
    epochs = [[k for rank in range(RANKS) for batch in per_rank[rank][e * 6:(e + 1) * 6] for k in batch]
              for e in range(2)]
    for keys in epochs:
        assert sorted(keys) == sorted(f"s{s}-{i}" for s, c in enumerate(COUNTS) for i in range(c))
    assert epochs[0] != epochs[1]
    assert consume(urls, 0, 12)[0] == per_rank[0], "the same seed must give the same order"
    assert consume(urls, 0, 12, seed=1)[0] != per_rank[0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_uneven_ranks_stay_in_step(tmp_path, fmt):
    # 49 samples over 4 slots: shares of 12 and 13; the endless stream never leaves a rank short,
    # and after many epochs the ranks' positions still differ by less than one epoch's share.
    counts = COUNTS[:-1] + [11]
    urls = write_counted_shards(tmp_path, counts, fmt=fmt)
    loaders = [consume(urls, rank, 40, counts=counts, workers=0)[1] for rank in range(RANKS)]
    epochs = [loader.positions[0][0] for loader in loaders]
    assert all(e >= 6 for e in epochs) and max(epochs) - min(epochs) <= 1


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stop", [5, 7])  # odd: the resumed DataLoader starts with the other worker
def test_resume_equals_uninterrupted(tmp_path, stop, fmt):
    urls = write_counted_shards(tmp_path, COUNTS, fmt=fmt)
    for rank in range(RANKS):
        uninterrupted, _ = consume(urls, rank, 14)
        first, loader = consume(urls, rank, stop)
        state = loader.state_dict()
        rest, _ = consume(urls, rank, 14 - stop, state=state)
        assert first + rest == uninterrupted


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_gives_the_same_pixels_and_decodes_only_new_samples(tmp_path, monkeypatch, fmt):
    urls = write_counted_shards(tmp_path, COUNTS, fmt=fmt)
    view = SupervisedTrainView(8, (0.3, 1.0), (0.75, 1.33), 0.5, "rand-m5-mstd0.5", 0.0, "random", (0.5,) * 3)
    def images(batches, state=None):
        loader = Loader(dataset(urls, 1, counts=COUNTS, shuffle_buffer=8, view=view), 0)
        if state:
            loader.load_state_dict(state)
        return [b["image"] for b in islice(iter(loader), batches)], loader
    uninterrupted, _ = images(6)
    _, loader = images(4)
    calls = []
    original = SupervisedTrainView.__call__
    monkeypatch.setattr(SupervisedTrainView, "__call__", lambda self, image: calls.append(1) or original(self, image))
    resumed, _ = images(2, loader.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted[4:]))
    assert len(calls) == 2 * 4, "samples consumed before the resume must not be decoded again"


@pytest.mark.parametrize("fmt", FORMATS)
def test_validation_sees_every_sample_once(tmp_path, fmt):
    urls = write_counted_shards(tmp_path, COUNTS, fmt=fmt)
    for counts in (COUNTS, None):
        batches = {rank: list(Loader(dataset(urls, rank, counts=counts, train=False, batch_size=5), WORKERS))
                   for rank in range(RANKS)}
        keys = [k for rank in batches for b in batches[rank] for k in b["__keys__"]]
        assert sorted(keys) == sorted(all_keys(urls)) and len(keys) == len(set(keys))
        if counts:
            per_rank = [sum(len(b["__keys__"]) for b in batches[rank]) for rank in range(RANKS)]
            assert per_rank == [24, 24]
        # Twice in a row (the trainer evaluates many times): the same samples again.
        again = [k for b in Loader(dataset(urls, 0, counts=counts, train=False, batch_size=5), WORKERS)
                 for k in b["__keys__"]]
        assert sorted(again) == sorted(k for b in batches[0] for k in b["__keys__"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_resampled_draws_shards_with_replacement(tmp_path, fmt):
    urls = write_counted_shards(tmp_path, COUNTS, fmt=fmt)
    def epoch_keys(rank, epoch):
        return [s["__key__"] for role in range(WORKERS)
                for s in dataset(urls, rank, resampled=True).raw_samples(epoch, role, WORKERS)]
    epochs = [[k for rank in range(RANKS) for k in epoch_keys(rank, e)] for e in range(3)]
    for keys in epochs:
        # 4 slots draw round(7 / 4) = 2 shards each: 8 draws of 7 shards must repeat one.
        assert set(keys) <= set(all_keys(urls)) and max(Counter(keys).values()) >= 2
    assert epochs[0] != epochs[1]
    assert epoch_keys(1, 2) == epoch_keys(1, 2) != epoch_keys(0, 2), "seeded per (epoch, rank, worker)"


def test_bad_samples_are_skipped_and_counted(tmp_path):
    cases = write_bad_shards(tmp_path)
    view = EvalView(16, 1.0)
    ds = ShardDataset(cases["urls"], view, 4, rank=0, world_size=1, seed=0, train=False)
    loader = Loader(ds, 0)
    batches = list(loader)
    keys = [k for b in batches for k in b["__keys__"]]
    assert sorted(keys) == sorted(cases["good"]), "every good or convertible sample, once"
    assert all(b["image"].shape[1:] == (3, 16, 16) and b["image"].dtype == torch.uint8 for b in batches)
    assert dict(loader.skipped) == cases["skips"]


def test_skip_rate_stops_with_a_clear_message(tmp_path):
    cases = write_bad_shards(tmp_path, good_per_shard=2)  # 6 bad of 15 samples per epoch
    ds = ShardDataset(cases["urls"], EvalView(16, 1.0), 2, rank=0, world_size=1, seed=0, train=True)
    with pytest.raises(SkipRateError, match=r"data\.max_skip_rate=0\.1"):
        list(islice(Loader(ds, 0, max_skip_rate=0.1, min_samples=20), 100))
    ds = ShardDataset(cases["urls"], EvalView(16, 1.0), 2, rank=0, world_size=1, seed=0, train=True)
    assert len(list(islice(Loader(ds, 0, max_skip_rate=0.9, min_samples=20), 30))) == 30


@pytest.mark.parametrize("fmt", FORMATS)
def test_sources_resolve_to_the_same_shards(tmp_path, fmt):
    urls = write_counted_shards(tmp_path, COUNTS, fmt=fmt)
    from_index = resolve(str(tmp_path), "train")
    assert from_index.urls == urls and from_index.counts == COUNTS and from_index.samples == 48
    assert resolve(str(tmp_path / f"train-{{000000..000006}}.{fmt}"), "train").urls == urls
    assert resolve(urls, "train").urls == urls


def test_missing_shards_are_listed_before_training(tmp_path):
    from pretrain.config import load_config
    from pretrain.plan import resolve_sources

    urls = write_counted_shards(tmp_path, COUNTS)
    for lost in (urls[1], urls[4]):
        Path(lost).unlink()
    cfg = load_config(None, [f"data.train=[{','.join(urls)}]", "data.num_classes=3", "train.steps=1"])
    with pytest.raises(ShardError, match="2 of 7 shards") as error:
        resolve_sources(cfg)
    assert urls[1] in str(error.value) and urls[4] in str(error.value)


def test_data_config_checks_the_skip_rate():
    from pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.max_skip_rate"):
        load_config(None, ["data.synthetic=true", "train.steps=1", "data.max_skip_rate=1.5"])


def test_data_benchmark_prints_its_table_and_ratio(capsys):
    from pretrain.bench.__main__ import main

    assert main(["data", "--images", "14", "--rounds", "1", "--size", "32", "--batch-size", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines[2:6]] == ["decode-only,", "baseline", "vitscale", "decode-only,"]
    assert lines[-1].startswith("ratio ") and float(lines[-1].split()[1]) > 0
    assert main(["nonsense"]) == 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_training_share_without_samples_is_an_error_not_a_hang(tmp_path, fmt):
    """...and its data worker ends with the error (workers ignore SIGTERM, torch's last resort)."""
    urls = write_counted_shards(tmp_path, [0, 0], index=False, fmt=fmt)
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(ShardError, match="no samples in epoch 0"):
        next(iter(Loader(ShardDataset(urls, KeyOnlyView(), 2, rank=0, world_size=1, seed=0, train=True), 1)))
    assert {p.pid for p in multiprocessing.active_children()} <= before


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_runs_loaders_are_built_from_its_config_and_sources(tmp_path, fmt):
    """pretrain.data.loaders: what the trainer gets for its config, the shards plan.resolve_sources
    found (either format) and its rank: the training stream of this rank, the val share, or none."""
    from pretrain.config import load_config
    from pretrain.data.loaders import build_train_loader, build_val_loader
    from pretrain.dist import DistEnv
    from pretrain.plan import resolve_sources

    urls = write_counted_shards(tmp_path, COUNTS, fmt=fmt)
    overrides = [f"data.train={tmp_path}", f"data.val=[{','.join(urls[:3])}]", "data.batch_size=4", "data.workers=0",
                 "data.shuffle_buffer=8", "data.max_skip_rate=0.3", "data.val_batch_size=5", "train.steps=1"]
    cfg = load_config(None, overrides)
    train_set, val_set = resolve_sources(cfg)
    dist = DistEnv(rank=1, world_size=RANKS)
    train = build_train_loader(cfg, train_set, KeyOnlyView(), dist, 3)
    assert train.max_skip_rate == 0.3 and train.dataset.counts == COUNTS
    assert [b["__keys__"] for b in islice(train, 7)] == consume(urls, 1, 7, workers=0)[0]
    val = build_val_loader(cfg, val_set, KeyOnlyView(), dist)
    keys = [k for b in val for k in b["__keys__"]]
    others = [k for b in build_val_loader(cfg, val_set, KeyOnlyView(), DistEnv(0, RANKS)) for k in b["__keys__"]]
    assert sorted(keys + others) == sorted(all_keys(urls[:3])) and not set(keys) & set(others)
    assert build_val_loader(cfg, val_set, None, dist) is None and build_val_loader(cfg, None, KeyOnlyView(), dist) is None
    synthetic = build_train_loader(load_config(None, [*overrides, "data.synthetic=true", "data.image_size=8"]), None,
                                   SupervisedTrainView(8, (0.3, 1.0), (0.75, 1.33), 0.5, None, 0.0, "random",
                                                       (0.5,) * 3), dist, 3)
    batch = next(iter(synthetic))
    assert batch["image"].shape == (4, 3, 8, 8) and set(batch["label"].tolist()) <= {0, 1, 2}
