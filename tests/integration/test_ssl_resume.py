"""A DINO (ZeRO-3) and a MoBY (ZeRO-2) run stopped and resumed equal uninterrupted runs exactly:
teacher, centre, queues, losses and the exported backbone."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_worker
from tests.helpers import RESUME_DINO, RESUME_MOBY

pytestmark = pytest.mark.slow

COMMON = ["run.threads=1", "train.progress=false", "data.workers=1", "data.image_size=32", "data.batch_size=8",
          "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]", "train.log_every=1", "train.ckpt_every=0",
          "optim.lr=0.01", "engine.precision=bf16"]


def test_resume_equals_uninterrupted(tmp_path, digits_dir):
    result = tmp_path / "result.json"
    cases = json.dumps({"dino": [f"data.train={digits_dir}", *COMMON, *RESUME_DINO],
                        "moby": [f"data.train={digits_dir}", *COMMON, *RESUME_MOBY]})
    run_worker("ssl_resume_worker", str(tmp_path), str(result), "4", cases)
    results = json.loads(result.read_text())
    for name, r in results.items():
        assert r["state_keys"] > 10, name
        assert r["state_differs"] == [], f"{name}: differs after resume: {r['state_differs'][:5]}"
        assert r["export_equal"], name
        assert sorted(r["whole"]) == [str(s) for s in range(1, 5)], name
        assert r["split"] == r["whole"], f"{name}: losses differ after resume"
