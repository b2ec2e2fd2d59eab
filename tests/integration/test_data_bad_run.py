"""A training run through ``python -m pretrain`` on shards holding every kind of bad data."""

from __future__ import annotations

import json
from collections import Counter

from pretrain.data.stream import ShardDataset
from tests.conftest import QUIET, TINY_VIT, run_module
from tests.unit.data_samples import write_bad_shards

BATCH, STEPS = 8, 7


def expected_skips(cases: dict, wanted_good: int) -> Counter:
    """What the run must have counted: every problem met before its ``wanted_good``-th usable sample.

    The stream reads each epoch's shards in the order ``epoch_order`` gives (tested elsewhere),
    each shard in tar order, a broken shard's problem after its readable samples; no shuffle buffer.
    """
    order = ShardDataset(cases["urls"], None, 1, rank=0, world_size=1, seed=0, train=True)
    counted: Counter = Counter()
    good, epoch = 0, 0
    while True:
        for shard in order.epoch_order(epoch):
            for event in cases["events"][shard]:
                if event is not None:
                    counted[event] += 1
                    continue
                good += 1
                if good == wanted_good:
                    return counted
        epoch += 1


def test_a_run_on_bad_data_finishes_and_counts_every_problem(tmp_path):
    cases = write_bad_shards(tmp_path / "shards")
    urls = cases["urls"]
    run_dir = tmp_path / "run"
    run_module("pretrain", *TINY_VIT, *QUIET, f"run.dir={run_dir}", f"data.train=[{','.join(urls)}]",
               "data.num_classes=3", f"data.batch_size={BATCH}", "data.shuffle_buffer=0", "data.max_skip_rate=0.5",
               f"train.steps={STEPS}", "train.log_every=1", "train.ckpt_every=0", "train.export=false",
               "engine.zero_stage=1", "run.seed=0")
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["step"] == STEPS
    expected = expected_skips(cases, STEPS * BATCH)
    assert summary["skipped_samples"] == dict(expected)
    assert set(expected) == {"undecodable", "no_label", "bad_label", "no_image", "truncated_shard", "empty_shard"}
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [entry for entry in logged if "data/skipped_undecodable" in entry][-1]
    assert last["data/skipped_undecodable"] == expected["undecodable"]


def test_a_run_stops_when_too_much_is_skipped(tmp_path):
    cases = write_bad_shards(tmp_path / "shards")
    result = run_module("pretrain", *TINY_VIT, *QUIET, f"run.dir={tmp_path / 'run'}",
                        f"data.train=[{','.join(cases['urls'])}]", "data.num_classes=3", "data.batch_size=8",
                        "train.steps=40", "train.ckpt_every=0", "train.export=false", "engine.zero_stage=1",
                        check=False)
    assert result.returncode != 0
    assert "data.max_skip_rate=0.05" in result.stderr and "pretrain.data.check" in result.stderr
