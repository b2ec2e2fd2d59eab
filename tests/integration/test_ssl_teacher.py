"""The momentum teacher follows the EMA of the student's fp32 master weights on every ZeRO stage."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_worker
from tests.helpers import RUN_DINO, RUN_MOBY, ZERO3_SMALL_PERSISTENCE

pytestmark = pytest.mark.slow

COMMON = ["run.threads=1", "train.progress=false", "data.workers=0", "data.image_size=32", "data.batch_size=8",
          "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]", "train.steps=3", "train.export=false",
          "train.ckpt_every=0", "optim.lr=0.01", "model.drop_path=0.1", ZERO3_SMALL_PERSISTENCE]
CASES = {f"dino-{stage}-{precision}": [*RUN_DINO, f"engine.zero_stage={stage}", f"engine.precision={precision}"]
         for stage, precision in ((0, "fp32"), (0, "bf16"), (1, "bf16"), (2, "bf16"), (3, "bf16"))}
CASES.update({f"moby-{stage}-bf16": [*RUN_MOBY, "objective.queue_size=64", f"engine.zero_stage={stage}",
                                     "engine.precision=bf16"] for stage in (3,)})


def test_teacher_is_ema_of_fp32_masters_on_every_zero_stage(tmp_path, digits_dir):
    """DINO on every stage (fp32 and bf16 without ZeRO: the masters live in different places); MoBY,
    whose teacher pairs two modules and has batch-norm buffers, on ZeRO-3 (ZeRO-2 in the resume test)."""
    result = tmp_path / "result.json"
    cases = {name: [f"data.train={digits_dir}", *COMMON, *overrides] for name, overrides in CASES.items()}
    run_worker("ssl_teacher_worker", str(tmp_path), str(result), json.dumps(cases))
    results = json.loads(result.read_text())
    assert sorted(results) == sorted(CASES)
    for case, r in results.items():
        assert r["steps"] == 3, case
        assert r["moved"] > 1e-3, f"{case}: the student did not move away from its EMA; the check is void"
        assert r["master"] < 1e-6, f"{case}: teacher differs from the EMA of the fp32 masters by {r['master']}"
        assert r["compute"] == 0.0, f"{case}: teacher compute weights are not its fp32 state rounded once"
