"""ZeRO-3 with ``engine.zero_init`` builds and trains every objective, in fp32 and in bf16, whatever
DeepSpeed's accelerator answers about fp16 support (forced both ways, tests/accelerator.py).

DeepSpeed 0.19.8's ``zero.Init`` ignored the dtype it was given where the accelerator denied fp16,
and built bf16 weights: a fp32 run then failed at its first forward, MoBY's teacher at its first
update, and the partitioned build no longer equalled the unpartitioned one.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import TINY_SWIN, TINY_VIT, run_worker
from tests.helpers import RUN_DINO, RUN_MOBY, ZERO3_SMALL_PERSISTENCE

pytestmark = pytest.mark.slow

COMMON = ["run.threads=1", "train.progress=false", "data.workers=0", "data.image_size=32", "data.batch_size=4",
          "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]", "train.epochs=null", "train.steps=2",
          "train.log_every=1", "train.ckpt_every=0", "train.export=false", "optim.lr=0.01", "model.drop_path=0",
          "engine.zero_stage=3", "engine.zero_init=true", ZERO3_SMALL_PERSISTENCE]
OBJECTIVES = {
    "supervised": [*TINY_VIT, "objective.mixup=0", "objective.cutmix=0", "objective.reprob=0",
                   "objective.auto_augment=null"],
    "dino": RUN_DINO,
    "dinov2": [*RUN_DINO, "objective.name=dinov2", "objective.ibot_out_dim=24"],
    "moby": [*RUN_MOBY, "objective.queue_size=16"],
    "simmim": [*TINY_SWIN, "objective.name=simmim", "objective.mask_patch_size=8", "objective.hflip=0"],
}
PRECISIONS = ("fp32", "bf16")


@pytest.mark.parametrize("answers", ["fp16=no,bf16=yes", "fp16=yes,bf16=yes"])
def test_every_objective_builds_exactly_and_trains_at_zero3(tmp_path, digits_dir, force_accelerator, answers):
    force_accelerator(answers)
    cases = {f"{name}-{precision}": [f"data.train={digits_dir}", "data.prepare=none", *COMMON, *overrides,
                                     f"engine.precision={precision}"]
             for name, overrides in OBJECTIVES.items() for precision in PRECISIONS}
    result = tmp_path / "result.json"
    run_worker("zero3_answers_worker", str(tmp_path), str(result), json.dumps(cases))
    results = json.loads(result.read_text())
    assert results.pop("answers") == {"fp16": "fp16=yes" in answers, "bf16": True}  # the forcing reached the ranks
    assert sorted(results) == sorted(cases)
    for case, r in results.items():
        build, run = r["build"], r["run"]
        assert build["count"] > 0 and build["dtypes"] == [build["expected"]], f"{case}: {build}"
        assert build["difference"] == 0.0, f"{case}: partitioned build differs from the whole one: {build}"
        assert run["steps"] == 2, f"{case}: {run}"
        if "master" in run:  # a momentum teacher
            assert run["moved"] > 1e-3 and run["master"] < 1e-6 and run["compute"] == 0.0, f"{case}: {run}"
        else:
            assert len(run["losses"]) == 2 and all(math.isfinite(x) for x in run["losses"]), f"{case}: {run}"
