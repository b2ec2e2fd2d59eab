"""Where a checkpoint's universal conversion is kept (pretrain.state.conversion), with the engine's
writer stood in for: made once, recorded in checksums.json, made again when altered, never left
half-written."""

from __future__ import annotations

import json

import pytest
import torch

from pretrain.checkpoint import CheckpointError
from pretrain.dist import DistEnv
from pretrain.state import conversion
from tests.conftest import flip_bytes


@pytest.fixture
def writes(monkeypatch):
    """The conversions written; each writes one weights file into ``out`` (as the engine would)."""
    made = []

    def write_universal(checkpoint, out, module):
        (out / "zero").mkdir(parents=True)
        torch.save({"param": torch.arange(8.0)}, out / "zero" / "fp32.pt")
        made.append(out)

    monkeypatch.setattr(conversion, "write_universal", write_universal)
    return made


def test_converted_once_recorded_and_again_when_altered(tmp_path, writes):
    target = conversion.convert_to_universal(tmp_path, torch.nn.Module(), DistEnv())
    assert target == tmp_path / "universal" and len(writes) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["universal"]  # the scratch directory is gone
    recorded = json.loads((target / "checksums.json").read_text())["files"]
    assert list(recorded) == ["zero/fp32.pt"]

    conversion.convert_to_universal(tmp_path, torch.nn.Module(), DistEnv())
    assert len(writes) == 1  # whole: kept
    flip_bytes(target / "zero" / "fp32.pt")
    conversion.convert_to_universal(tmp_path, torch.nn.Module(), DistEnv())
    assert len(writes) == 2 and conversion.universal_problem(target, DistEnv()) is None


def test_a_conversion_refused_midway_leaves_nothing(tmp_path, monkeypatch):
    def refuse(checkpoint, out, module):
        out.mkdir(parents=True)
        (out / "half.pt").write_bytes(b"half")
        raise CheckpointError(f"{checkpoint / 'x.pt'}: refused")

    monkeypatch.setattr(conversion, "write_universal", refuse)
    with pytest.raises(CheckpointError, match="x.pt: refused"):
        conversion.convert_to_universal(tmp_path, torch.nn.Module(), DistEnv())
    assert list(tmp_path.iterdir()) == []
