"""Under ZeRO-3 the objective is built partitioned (deepspeed.zero.Init): no rank ever holds the
whole model, the momentum teacher included. That the weights come out exactly as an unpartitioned
build makes them is shown by test_pretrain.py's ZeRO-0 == ZeRO-3 losses and its export check,
whose ZeRO-3 runs are built this way."""

from __future__ import annotations

import json

from tests.conftest import run_worker

VIT = ["model.name=vit_small_patch16_224", "model.kwargs={depth: 4}", "data.image_size=32", "data.synthetic=true",
       "data.num_classes=10", "data.batch_size=2", "train.steps=10", "engine.zero_stage=3", "engine.precision=bf16"]
CASES = {"supervised": VIT, "dino": [*VIT, "objective.name=dino", "objective.out_dim=256", "objective.hidden_dim=64",
                                     "objective.bottleneck_dim=32", "objective.local_crops=0"]}


def test_zero3_builds_the_model_partitioned_on_every_rank(tmp_path):
    result = tmp_path / "result.json"
    run_worker("zero_init_worker", str(result), json.dumps(CASES), timeout=300)
    for case, ranks in json.loads(result.read_text()).items():
        for rank, r in enumerate(ranks):
            where = f"{case}, rank {rank}: {r}"
            # Afterwards each rank holds its half of every parameter (padded to whole elements), nothing whole.
            assert r["held_whole_after"] == 0, where
            assert r["numel"] / 2 <= r["held_in_partitions"] < r["numel"] / 2 + 1000, where
            # While building, at most a module's own parameters were whole at once (a linear
            # layer's weight and bias, or one parameter being initialized); built unpartitioned
            # (the control, which this measure must see), all of them.
            assert r["most_whole"] <= 2 * r["largest"] < r["numel"] / 4, where
            assert r["most_whole_unpartitioned_build"] == r["numel"], where
