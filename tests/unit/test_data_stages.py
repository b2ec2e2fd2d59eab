"""Each stage of the stream alone (pretrain.data.dataset composes them): split, read, decode, view,
collate, and the fault accounting that runs beside them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data._utils.pin_memory import pin_memory

from pretrain.data import collate as collate_stage
from pretrain.data.collate import WorkerBatch, collate
from pretrain.data.decode import BadSample, EncodedImage, decode
from pretrain.data.faults import MAX_BROKEN_NAMED, Faults, SkipRateError, check_skip_rate
from pretrain.data.read import ShardReader
from pretrain.data.split import Piece, Share, Split
from pretrain.data.transforms import SupervisedTrainView
from pretrain.data.view import SeededView, sample_seed
from tests.unit.data_samples import tiny_jpeg, write_counted_shards


def test_split_gives_every_sample_to_one_slot_without_reading_anything():
    urls, counts = tuple(f"shard-{i}" for i in range(5)), (4, 7, 1, 5, 3)
    shares = [Split(urls, counts, seed=0, rank=rank, world_size=2, shuffled=True).share(1, role, 2)
              for rank in range(2) for role in range(2)]
    taken = Counter((p.url, i) for share in shares for p in share.pieces for i in range(p.start, p.stop))
    assert set(taken.values()) == {1} and len(taken) == sum(counts)
    sizes = [sum(p.stop - p.start for p in share.pieces) for share in shares]
    assert max(sizes) - min(sizes) <= 1
    order = Split(urls, counts, seed=0, rank=0, world_size=2, shuffled=True)
    assert order.epoch_order(0) != order.epoch_order(1) and sorted(order.epoch_order(0)) == list(range(5))
    # Without counts: whole shards round-robin; with fewer shards than slots, every slot reads all of them.
    assert Split(urls, None, 0, 0, 2, shuffled=False).share(0, 1, 2) == Share((Piece("shard-1"),))
    assert Split(urls[:3], None, 0, 1, 2, shuffled=False).share(0, 1, 2) == Share(
        tuple(Piece(u) for u in urls[:3]), stride=4, offset=3)
    drawn = Split(urls, None, 0, 0, 1, shuffled=True, resampled=True)
    assert drawn.share(0, 0, 1) == drawn.share(0, 0, 1) != drawn.share(1, 0, 1)


def test_read_yields_a_share_and_counts_a_vanished_shard_as_the_samples_it_held(tmp_path):
    urls = write_counted_shards(tmp_path, [3, 4, 2])
    Path(urls[1]).unlink()
    reader = ShardReader(dict(zip(urls, [3, 4, 2])))
    faults = Faults()
    share = Share((Piece(urls[0], 1), Piece(urls[1]), Piece(urls[2], 0, 2, frozenset({1}))))
    assert [s["__key__"] for s in reader.samples(share, faults)] == ["s0-1", "s0-2", "s2-1"]
    assert faults == Faults(Counter(unreadable_shard=4), [urls[1]], 0)
    # Slots that share shards: only the first counts their faults.
    others = Faults()
    assert [s["__key__"] for s in reader.samples(Share((Piece(urls[0]), Piece(urls[1])), 2, 1), others)] == ["s0-1"]
    assert others == Faults()


def test_decode_gives_image_and_label_or_says_why_not():
    image, label = decode({"__key__": "a", "jpg": tiny_jpeg(0), "cls": b"2"})
    assert image.mode == "RGB" and label == 2
    assert isinstance(decode({"__key__": "a", "jpg": tiny_jpeg(0), "cls": b"2"}, lazy=True)[0], EncodedImage)
    assert decode({"__key__": "a", "jpg": tiny_jpeg(0)}, labelled=False)[1] == -1
    for sample, reason in [({"txt": b"x"}, "no_image"), ({"jpg": tiny_jpeg(0)}, "no_label"),
                           ({"jpg": tiny_jpeg(0), "cls": b"-1"}, "bad_label"), ({"jpg": b"junk", "cls": b"1"}, "undecodable")]:
        with pytest.raises(BadSample) as bad:
            decode({"__key__": "a", **sample})
        assert bad.value.reason == reason


def test_view_draws_the_same_crops_for_the_same_place_in_the_stream():
    view = SeededView(SupervisedTrainView(8, (0.08, 1.0), (3 / 4, 4 / 3), 0.5, None, 0.0, "bilinear", (0.5,) * 3))
    jpeg = tiny_jpeg(1, size=64)
    image = EncodedImage.open(jpeg)
    seed = sample_seed(0, 2, 1, 0, 17)
    assert torch.equal(view(image, "a", seed)["image"], view(image, "a", seed)["image"])
    assert not torch.equal(view(image, "a", seed)["image"], view(image, "a", sample_seed(0, 2, 1, 0, 18))["image"])
    broken = EncodedImage.open(jpeg[:len(jpeg) // 2])  # the header reads; the pixels do not
    with pytest.raises(BadSample, match="undecodable: a:"):
        view(broken, "a", seed)


def test_collate_keeps_the_bookkeeping_beside_the_batch(monkeypatch):
    items = [{"image": torch.full((2,), i, dtype=torch.uint8), "label": i, "__key__": f"k{i}"} for i in range(3)]
    faults = Faults(Counter(undecodable=1), [], 4)
    delivered = collate(items, role=1, position=(2, 9), faults=faults)
    assert sorted(delivered.batch) == ["__keys__", "image", "label"] and delivered.batch["__keys__"] == ["k0", "k1", "k2"]
    assert (delivered.role, delivered.position, delivered.faults) == (1, (2, 9), faults)
    # The DataLoader's pinning reaches only the batch.
    monkeypatch.setattr(collate_stage, "pin_memory", lambda batch: {**batch, "pinned": True})
    pinned = pin_memory(delivered)
    assert isinstance(pinned, WorkerBatch) and pinned.batch["pinned"] and pinned.faults is faults


def test_faults_are_handed_over_per_batch_and_checked_against_the_skip_rate():
    worker, rank = Faults(), Faults()
    for i in range(MAX_BROKEN_NAMED + 2):
        worker.shard_broke(f"shard-{i}", "unreadable_shard", 10)
        worker.sample_skipped("undecodable")
        worker.seen += 5
        rank.add(worker.take())
        assert worker == Faults()
    assert rank.skipped == Counter(unreadable_shard=70, undecodable=7) and rank.seen == 35
    assert rank.broken == [f"shard-{i}" for i in range(2, MAX_BROKEN_NAMED + 2)]
    check_skip_rate(rank, None, 0)
    check_skip_rate(rank, 0.99, 0)
    with pytest.raises(SkipRateError, match=r"77 of 105 samples .*unreadable_shard 70, undecodable 7.* shard-6"):
        check_skip_rate(rank, 0.5, 100)
    check_skip_rate(rank, 0.5, 106)  # too few samples yet to judge
