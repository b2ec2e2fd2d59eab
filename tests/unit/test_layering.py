"""Where DeepSpeed and raw collectives may appear: ZeRO stays inside the engine, collectives go
through DistEnv. The benchmarks are exempt: their baselines are, by definition, plain DeepSpeed and
torch loops, and the memory benchmark reads DeepSpeed's own accounting."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO

DEEPSPEED = re.compile(r"^\s*(import deepspeed|from deepspeed)|\.ds_[a-z]|[\"']ds_[a-z]", re.MULTILINE)
COLLECTIVES = re.compile(r"^\s*(import torch\.distributed|from torch\.distributed)", re.MULTILINE)


def sources(*exempt: str) -> list[str]:
    files = sorted(str(p.relative_to(REPO)) for package in ("pretrain", "finetune") for p in (REPO / package).rglob("*.py"))
    return [f for f in files if not f.startswith(("pretrain/bench/", *exempt))]


@pytest.mark.parametrize("rule, pattern, exempt", [
    ("DeepSpeed and its ds_ attributes only in pretrain/engine/", DEEPSPEED, ("pretrain/engine/",)),
    ("torch.distributed only in pretrain/dist.py and pretrain/engine/", COLLECTIVES,
     ("pretrain/dist.py", "pretrain/engine/")),
], ids=["deepspeed", "collectives"])
def test_layers_stay_where_they_belong(rule, pattern, exempt):
    files = sources(*exempt)
    assert "pretrain/trainer.py" in files and "finetune/knn.py" in files  # the scan reads the packages
    offenders = {f: m.group(0).strip() for f in files if (m := pattern.search((REPO / f).read_text()))}
    assert not offenders, f"{rule}: {offenders}"
