"""Where a checkpoint's universal conversion is kept (pretrain.state.conversion), with the engine's
writer stood in for: made once, recorded in checksums.json, made again when altered, never left
half-written."""

from __future__ import annotations

import json

import pytest
import torch

from pretrain.dist import DistEnv
from pretrain.errors import CheckpointError
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


def test_the_engines_conversion_reads_weights_only(tmp_path):
    """DeepSpeed's conversion asks torch to unpickle fully; a crafted model-states file is refused,
    naming it, and its code does not run, whoever calls the conversion."""
    from pretrain.engine import write_universal
    from tests.conftest import write_code_payload

    checkpoint = tmp_path / "step_00000002"
    checkpoint.mkdir()
    torch.save({"optimizer_state_dict": {}}, checkpoint / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    marker = tmp_path / "payload-ran"
    write_code_payload(checkpoint / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(CheckpointError, match=f"^{checkpoint / 'mp_rank_00_model_states.pt'}: refused"):
        write_universal(checkpoint, tmp_path / "universal", torch.nn.Module())
    assert not marker.exists()
