"""A checkpoint read for its weights (pretrain.state.reading): where it is, checked against its
meta.json when vitscale wrote it, read weights-only; on a stand-in for DeepSpeed's ZeRO-0 layout (one
model-states file)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from pretrain.errors import CheckpointError
from pretrain.state.layout import file_checksum, tag_for
from pretrain.state.reading import consolidated, fp32_state, locate
from tests.conftest import flip_bytes, write_code_payload

MODEL_FILE = "mp_rank_00_model_states.pt"


def checkpoint(run_dir, step: int = 2, meta: bool = True):
    """A run dir with one checkpoint of a module with a half-precision weight and a buffer."""
    tag_dir = run_dir / "checkpoints" / tag_for(step)
    tag_dir.mkdir(parents=True)
    torch.save({"module": {"w": torch.arange(4.0).half(), "centre": torch.ones(2)}}, tag_dir / MODEL_FILE)
    if meta:
        (tag_dir / "meta.json").write_text(json.dumps({"files": {MODEL_FILE: file_checksum(tag_dir / MODEL_FILE)}}))
    (run_dir / "checkpoints" / "latest").write_text(tag_for(step))
    return tag_dir


def test_a_run_dir_its_checkpoints_and_one_checkpoint_are_located(tmp_path):
    tag_dir = checkpoint(tmp_path)
    assert locate(tmp_path) == (tmp_path / "checkpoints", None)
    assert locate(tmp_path / "checkpoints") == (tmp_path / "checkpoints", None)
    assert locate(tag_dir) == (tmp_path / "checkpoints", tag_for(2))
    assert locate(tmp_path / "elsewhere") is None


def test_weights_come_whole_in_fp32_and_buffers_for_the_module_that_owns_them(tmp_path):
    checkpoint(tmp_path)
    weights = consolidated(tmp_path / "checkpoints", None)
    assert weights["w"].dtype == torch.float32 and torch.equal(weights["w"], torch.arange(4.0))

    class WithCentre(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("centre", torch.zeros(2))

    state = fp32_state(tmp_path / "checkpoints", tag_for(2), buffers_of=WithCentre())
    assert torch.equal(state["centre"], torch.ones(2))


def test_a_changed_file_is_refused_naming_it_before_it_is_read(tmp_path):
    tag_dir = checkpoint(tmp_path)
    flip_bytes(tag_dir / MODEL_FILE)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(tag_dir / MODEL_FILE))}: corrupt: its sha256"):
        consolidated(tmp_path / "checkpoints", tag_for(2))


def test_a_foreign_checkpoint_that_would_run_code_is_refused_naming_the_file(tmp_path):
    tag_dir = checkpoint(tmp_path, meta=False)  # another DeepSpeed run's: no checksums to catch it first
    marker = tmp_path / "payload-ran"
    write_code_payload(tag_dir / MODEL_FILE, marker)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(tag_dir / MODEL_FILE))}: refused: loading it "
                                              f"would unpickle more than weights"):
        consolidated(tmp_path / "checkpoints", None)
    assert not marker.exists()


def test_latest_naming_no_checkpoint_says_so(tmp_path):
    checkpoint(tmp_path)
    (tmp_path / "checkpoints" / "latest").write_text("global_step9")
    with pytest.raises(CheckpointError, match="latest names 'global_step9', which is not a checkpoint in"):
        consolidated(tmp_path / "checkpoints", None)
