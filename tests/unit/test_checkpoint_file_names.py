"""Only the engine knows DeepSpeed's checkpoint file names: the rest of vitscale finds a checkpoint's
files through pretrain.state's layout, which asks the engine (pretrain.engine.checkpoint_io)."""

from __future__ import annotations

import re

from tests.conftest import REPO

# \b: the names of files, not of DeepSpeed's memory estimators (estimate_zero3_model_states_mem_needs)
DEEPSPEED_FILES = re.compile(r"(model|optim)_states\b|zero_pp_rank|mp_rank")


def test_deepspeed_file_names_only_in_the_engine():
    files = sorted(str(p.relative_to(REPO)) for package in ("pretrain", "finetune", "launch")
                   for p in (REPO / package).rglob("*.py"))
    assert "finetune/weights.py" in files and "pretrain/state/reading.py" in files  # the scan reads the packages
    assert any(DEEPSPEED_FILES.search((REPO / f).read_text()) for f in files if f.startswith("pretrain/engine/"))
    offenders = {f: m.group(0) for f in files if not f.startswith("pretrain/engine/")
                 if (m := DEEPSPEED_FILES.search((REPO / f).read_text()))}
    assert not offenders, f"DeepSpeed's checkpoint file names outside pretrain/engine/: {offenders}"
