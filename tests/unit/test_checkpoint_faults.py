"""A process SIGKILLed at each point of a checkpoint save (VITSCALE_TEST_KILL), and checkpoints that
must not be resumed: the files on disk afterwards, with a stand-in engine that writes files the way
DeepSpeed does (one model file, one optimizer file). tests/integration/test_faults.py does the same
with real 2-process runs."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal

import pytest
import torch

from pretrain.dist import DistEnv
from pretrain.errors import CheckpointError
from pretrain.state.checkpoints import Checkpoints
from pretrain.state.layout import tag_for
from tests.conftest import flip_bytes, write_code_payload
from tests.faults import KILL_ENV, KILL_POINTS

META = {"objective": "supervised", "model": "vit_tiny_patch16_224", "model_kwargs": {"embed_dim": 32},
        "image_size": 32, "parameters": {"model.head.weight": [10, 32]}}


class FilesEngine:
    def weights_finite(self) -> bool:
        return True

    def save(self, directory: str, tag: str, client_state: dict) -> list[str]:
        path = os.path.join(directory, tag)
        os.makedirs(path, exist_ok=True)
        files = [os.path.join(path, "mp_rank_00_model_states.pt"),
                 os.path.join(path, "zero_pp_rank_0_mp_rank_00_optim_states.pt")]
        torch.save({"module": {"w": torch.ones(4)}, **client_state}, files[0])
        torch.save({"state": torch.zeros(4)}, files[1])
        return files


def save_in_a_child(run_dir, step: int, kill: str = "", keep_last: int = 1) -> int:
    """Save step ``step`` in a forked process; its exit code (negative: the signal that ended it)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.environ[KILL_ENV] = kill
            Checkpoints(run_dir, keep_last=keep_last, dist=DistEnv()).save(FilesEngine(), step, {"step": step}, META)
        except BaseException:
            code = 1
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.parametrize("point", [p for p in KILL_POINTS if p.startswith("save-")])
def test_a_save_killed_at_any_point_leaves_the_previous_checkpoint_named_and_whole(tmp_path, point):
    assert save_in_a_child(tmp_path, 2) == 0
    assert save_in_a_child(tmp_path, 4, kill=f"{point}:0:4") == -signal.SIGKILL
    ckpts = Checkpoints(tmp_path, keep_last=1, dist=DistEnv())
    assert ckpts.latest() == tag_for(2)
    ckpts.verify(tag_for(2), META)  # whole: keep_last=1 did not prune the only complete checkpoint
    # The next save of step 4 replaces whatever the killed one left, then prunes step 2.
    stale = ckpts.directory / tag_for(4) / "zero_pp_rank_7_mp_rank_00_optim_states.pt"
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"left by another world size")
    assert save_in_a_child(tmp_path, 4) == 0
    assert ckpts.latest() == tag_for(4) and not stale.exists()
    assert sorted(p.name for p in ckpts.directory.iterdir() if p.is_dir()) == [tag_for(4)]


def test_prune_never_removes_the_only_complete_checkpoint(tmp_path):
    ckpts = Checkpoints(tmp_path, keep_last=1, dist=DistEnv())
    assert save_in_a_child(tmp_path, 2) == 0
    for step in (4, 6):  # saves that died before "latest" moved
        (ckpts.directory / tag_for(step)).mkdir()
    ckpts.prune(keep=ckpts.latest())
    assert [p.name for p in ckpts.directory.iterdir() if p.is_dir()] == [tag_for(2)]


def test_a_failed_write_raises_naming_the_checkpoint_and_removes_it(tmp_path):
    class FailingEngine(FilesEngine):
        def save(self, directory, tag, client_state):
            super().save(directory, tag, client_state)
            raise OSError(28, "No space left on device")

    ckpts = Checkpoints(tmp_path, keep_last=1, dist=DistEnv())
    assert save_in_a_child(tmp_path, 2) == 0
    with pytest.raises(CheckpointError, match=f"(?s)could not write checkpoint {ckpts.directory / tag_for(4)}.*"
                                              f"No space left on device.*still names .* {tag_for(2)}"):
        ckpts.save(FailingEngine(), 4, {}, META)
    assert ckpts.latest() == tag_for(2) and not (ckpts.directory / tag_for(4)).exists()


@pytest.mark.parametrize("change, named", [
    ({"objective": "dino"}, "written with objective 'supervised', this run has 'dino'"),
    ({"model_kwargs": {"embed_dim": 48}},
     "written with model_kwargs {'embed_dim': 32}, this run has {'embed_dim': 48}"),
    ({"parameters": {"model.head.weight": [5, 32]}}, "1 parameters differ (checkpoint vs this run: "
                                                     "model.head.weight: [10, 32] vs [5, 32])"),
])
def test_a_checkpoint_of_another_run_is_refused_naming_the_difference(tmp_path, change, named):
    assert save_in_a_child(tmp_path, 2) == 0
    ckpts = Checkpoints(tmp_path, keep_last=1, dist=DistEnv())
    with pytest.raises(CheckpointError) as e:
        ckpts.verify(tag_for(2), {**META, **change})
    assert str(e.value).startswith(f"{ckpts.directory / tag_for(2) / 'meta.json'}: ")
    assert named in str(e.value)


@pytest.mark.parametrize("damage", ["truncate", "no-meta"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage):
    assert save_in_a_child(tmp_path, 2) == 0
    path = tmp_path / "checkpoints" / tag_for(2)
    if damage == "truncate":
        victim = path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        victim.write_bytes(victim.read_bytes()[:-30])
    else:
        victim = path / "meta.json"
        victim.unlink()
    with pytest.raises(CheckpointError, match=str(victim)):
        Checkpoints(tmp_path, keep_last=1, dist=DistEnv()).verify(tag_for(2), json.loads(json.dumps(META)))


def test_non_finite_weights_are_never_written(tmp_path):
    class NonFiniteEngine(FilesEngine):
        def weights_finite(self) -> bool:
            return False

    ckpts = Checkpoints(tmp_path, keep_last=1, dist=DistEnv())
    assert save_in_a_child(tmp_path, 2) == 0
    with pytest.raises(CheckpointError, match="step 4: the weights are not finite"):
        ckpts.save(NonFiniteEngine(), 4, {}, META)
    assert ckpts.latest() == tag_for(2) and not (ckpts.directory / tag_for(4)).exists()


@pytest.mark.parametrize("damage, says", [
    ("flip", "corrupt: its sha256 differs from the one recorded in meta.json"),
    ("delete", "missing (the checkpoint's meta.json lists it"),
    ("add", "not written by this checkpoint's save (its meta.json does not list it)"),
])
def test_changed_missing_and_unlisted_files_are_refused_naming_them(tmp_path, damage, says):
    assert save_in_a_child(tmp_path, 2) == 0
    path = tmp_path / "checkpoints" / tag_for(2)
    victim = path / ("zero_pp_rank_1_mp_rank_00_optim_states.pt" if damage == "add"
                     else "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    if damage == "flip":
        flip_bytes(victim)
        assert __import__("zipfile").is_zipfile(victim)  # what the check before checksums looked at
    elif damage == "delete":
        victim.unlink()
    else:
        torch.save({"state": torch.zeros(4)}, victim)
    with pytest.raises(CheckpointError) as e:
        Checkpoints(tmp_path, keep_last=1, dist=DistEnv()).verify(tag_for(2), META)
    assert str(e.value).startswith(f"{victim}: {says}"), str(e.value)


def test_a_latest_that_is_not_utf8_is_refused_naming_it(tmp_path):
    assert save_in_a_child(tmp_path, 2) == 0
    pointer = tmp_path / "checkpoints" / "latest"
    pointer.write_bytes(b"step_\xff\xfe0002")
    with pytest.raises(CheckpointError, match=re.escape(f"{pointer}: not a checkpoint tag (not UTF-8 text)")):
        Checkpoints(tmp_path, keep_last=1, dist=DistEnv()).resumable(META)


def test_an_older_checkpoint_is_resumed_only_when_train_resume_from_asks(tmp_path):
    for step in (2, 4):
        assert save_in_a_child(tmp_path, step, keep_last=2) == 0
    ckpts = Checkpoints(tmp_path, keep_last=2, dist=DistEnv())
    assert ckpts.resumable(META, fallback=tag_for(2)) == tag_for(4)  # latest is whole: no fallback
    flip_bytes(ckpts.directory / tag_for(4) / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError) as e:
        ckpts.resumable(META)
    assert f"({tag_for(2)}), set train.resume_from=TAG" in str(e.value)  # says how, never does it by itself
    assert ckpts.latest() == tag_for(4)
    assert ckpts.resumable(META, fallback=tag_for(2)) == tag_for(2)
    assert ckpts.latest() == tag_for(2)  # the run continues from there
    with pytest.raises(CheckpointError, match=f"train.resume_from={tag_for(6)}: .* is not a complete checkpoint"):
        (ckpts.directory / "latest").write_bytes(b"step_9")
        ckpts.resumable(META, fallback=tag_for(6))


def test_deepspeed_states_load_weights_only_and_a_payload_does_not_run(tmp_path):
    """What DeepSpeed pickles besides tensors (ZeRO-1/2/3 and fp16 optimizer states) loads inside
    ``weights_only_loading`` even where DeepSpeed asks torch to unpickle fully; a file that would run
    code is refused and nothing runs."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from pretrain.engine import weights_only_loading

    dynamic = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2,
                                consecutive_hysteresis=False)
    state = {"loss_scaler": dynamic, "static_loss_scaler": LossScaler(2.0),
             "zero_stage": ZeroStageEnum.weights, "mappings": {"w": fragment_address(numel=4, start=8)},
             "fp32": torch.arange(4.0)}
    torch.save(state, tmp_path / "optim_states.pt")
    marker = tmp_path / "payload-ran"
    write_code_payload(tmp_path / "model_states.pt", marker)
    with weights_only_loading():
        loaded = torch.load(tmp_path / "optim_states.pt", weights_only=False)  # as DeepSpeed calls it
        with pytest.raises(pickle.UnpicklingError):
            torch.load(tmp_path / "model_states.pt", weights_only=False)
    assert not marker.exists()
    assert loaded["loss_scaler"].cur_scale == 2.0**16 and loaded["static_loss_scaler"].cur_scale == 2
    assert loaded["zero_stage"] is ZeroStageEnum.weights and loaded["mappings"]["w"].start == 8
    assert torch.equal(loaded["fp32"], torch.arange(4.0))
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # as it was before


def test_a_changed_universal_conversion_is_named_with_its_own_record(tmp_path):
    """The universal conversion's files are recorded in its checksums.json, not in a meta.json: the
    messages name the record that holds the checksum."""
    from pretrain.state.conversion import UNIVERSAL_CHECKSUMS, universal_problem
    from pretrain.state.layout import file_checksum

    universal = tmp_path / "universal"
    universal.mkdir()
    torch.save({"weights": torch.arange(64.0)}, universal / "buffers.pt")
    (universal / UNIVERSAL_CHECKSUMS).write_text(json.dumps({"files": {"buffers.pt":
                                                                       file_checksum(universal / "buffers.pt")}}))
    assert universal_problem(universal, DistEnv()) is None
    flip_bytes(universal / "buffers.pt")
    assert universal_problem(universal, DistEnv()) == (
        f"{universal / 'buffers.pt'}: corrupt: its sha256 differs from the one recorded in checksums.json when it "
        f"was written (bytes changed on disk)")
    (universal / "buffers.pt").unlink()
    assert universal_problem(universal, DistEnv()).startswith(
        f"{universal / 'buffers.pt'}: missing (the conversion's checksums.json lists it, ")
    torch.save({}, universal / "extra.pt")
    assert universal_problem(universal, DistEnv()) == (
        f"{universal / 'extra.pt'}: not written by this conversion's save (its checksums.json does not list it)")
