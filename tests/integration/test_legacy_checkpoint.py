"""A checkpoint written before the run-state redesign (tests/fixtures/legacy_checkpoint, by commit
2b071ce) still resumes, and exactly: read in its old format, it continues as the same state saved
in today's format does. (It used to be compared with a run that never stopped, from step 0; that
also pins the numerics of the views and optimizer of its commit, which #25 changed: device-side
draws and the fused AdamW.) It records no precision mode: it was DeepSpeed's bf16, which the
resumed runs (engine.autocast=auto) keep."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_module
from tests.fixtures.legacy_checkpoint import RUN, STEPS, STOP, shards

pytestmark = pytest.mark.slow

LEGACY = Path(__file__).parent.parent / "fixtures" / "legacy_checkpoint" / "checkpoints"


def losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in lines if "train/loss" in r}


def test_a_checkpoint_written_before_the_redesign_resumes_exactly(tmp_path):
    data = shards(tmp_path / "shards")
    common = [f"data.train={data}", *RUN, "train.export=true"]
    straight, through_today = tmp_path / "straight", tmp_path / "through-today"
    for run_dir in (straight, through_today):
        shutil.copytree(LEGACY, run_dir / "checkpoints")
    run_module("pretrain", *common, f"run.dir={straight}")
    # One step from the old format, saved in today's, then resumed from that.
    run_module("pretrain", *common, f"run.dir={through_today}", f"train.stop_at={STOP + 1}")
    today = json.loads((through_today / "checkpoints" / f"step_{STOP + 1:08d}" / "meta.json").read_text())
    assert today["precision_mode"] == {"precision": "bf16", "autocast": False}
    run_module("pretrain", *common, f"run.dir={through_today}")

    summary = json.loads((straight / "run.json").read_text())
    assert summary["resumed_from"] == f"step_{STOP:08d}" and summary["step"] == STEPS
    assert summary["precision"].startswith("bf16 weights")
    assert json.loads((through_today / "run.json").read_text())["resumed_from"] == f"step_{STOP + 1:08d}"
    assert sorted(losses(straight)) == [3, 4]
    assert losses(straight) == pytest.approx(losses(through_today), rel=0, abs=0)
    a, b = (load_file(str(d / "export" / "backbone.safetensors")) for d in (straight, through_today))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_old_client_state_is_read_under_todays_component_names():
    from pretrain.engine import weights_only_loading
    from pretrain.state.checkpointer import upgraded

    with weights_only_loading():
        saved = torch.load(LEGACY / f"step_{STOP:08d}" / "mp_rank_00_model_states.pt", weights_only=True)
    assert "world_size" not in saved  # the old format: everything in "trainer"
    state = upgraded(saved)
    assert state["world_size"] == 1 and state["trainer"] == {"step": STOP}
    assert state["step_guard"] == {"nonfinite_steps": 0, "overflow_steps": 0}
    assert state["data"] is saved["data"] and {"loss", "values", "micro"} <= set(state["log_window"])
