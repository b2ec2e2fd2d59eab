"""Two real processes (torch.distributed, gloo), each with 2 DataLoader workers: what the ranks read together,
from shards of every format."""

from __future__ import annotations

import json
import os
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pretrain.dist import free_port, init_distributed
from pretrain.data.sources import resolve
from pretrain.data.stream import Loader, ShardDataset
from tests.helpers import KeyOnlyView
from tests.unit.data_samples import FORMATS, write_counted_shards

COUNTS = [5, 9, 3, 8, 6, 7, 10, 2]  # 50 samples: shares of 12 and 13 over 2 ranks x 2 workers
WORKERS, BATCH = 2, 4


def rank_main(rank: int, world_size: int, port: int, shards: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = init_distributed()
    source = resolve(shards, "train")

    def loader(train: bool, state: dict | None = None) -> Loader:
        dataset = ShardDataset(source.urls, KeyOnlyView(), BATCH, rank=dist.rank, world_size=dist.world_size,
                               seed=3, train=train, shuffle_buffer=16, counts=source.counts)
        result = Loader(dataset, WORKERS)
        if state is not None:
            result.load_state_dict(state)
        return result

    train = [b["__keys__"] for b in islice(loader(True), 14)]
    first = loader(True)
    head = [b["__keys__"] for b in islice(first, 5)]
    tail = [b["__keys__"] for b in islice(loader(True, first.state_dict()), 9)]
    val = [k for b in loader(False) for k in b["__keys__"]]
    mine = {"train": train, "resumed": head + tail, "val": val}
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, mine)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_ranks_two_workers(tmp_path, fmt):
    write_counted_shards(tmp_path / "shards", COUNTS, fmt=fmt)
    out = tmp_path / "keys.json"
    # Forked, not spawned: a spawned rank (and each of its DataLoader workers) would import torch anew.
    mp.start_processes(rank_main, args=(2, free_port(), str(tmp_path / "shards"), str(out)), nprocs=2, join=True,
                       start_method="fork")
    ranks = json.loads(out.read_text())
    everything = sorted(f"s{s}-{i}" for s, c in enumerate(COUNTS) for i in range(c))
    # Shares of 25 samples per rank (12 + 13 over its workers): the first epoch ends inside batch 4
    # of one worker; each rank's first 6 batches hold 24 samples of epoch 0 and no sample twice.
    first_epoch = [k for r in ranks for batch in r["train"][:6] for k in batch]
    assert len(first_epoch) == len(set(first_epoch)) == 48 and set(first_epoch) <= set(everything)
    assert all(len(r["train"]) == 14 and all(len(b) == BATCH for b in r["train"]) for r in ranks)
    # Over 14 batches (56 samples per rank, 2.24 epochs) every sample appears 2 or 3 times in all.
    counts = Counter(k for r in ranks for batch in r["train"] for k in batch)
    assert set(counts) == set(everything) and set(counts.values()) <= {2, 3}
    assert ranks[0]["train"] != ranks[1]["train"]
    for r in ranks:
        assert r["resumed"] == r["train"], "the resumed stream must continue exactly"
    val = [k for r in ranks for k in r["val"]]
    assert sorted(val) == everything
    assert [len(r["val"]) for r in ranks] == [25, 25]
