"""A process SIGKILLed at each point of a checkpoint save (VITSCALE_TEST_KILL), and checkpoints that
must not be resumed: the files on disk afterwards, with a stand-in engine that writes files the way
DeepSpeed does (one model file, one optimizer file). tests/integration/test_faults.py does the same
with real 2-process runs."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from pretrain.checkpoint import CheckpointError, Checkpoints, tag_for
from pretrain.dist import DistEnv
from pretrain.faults import POINTS

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


def save_in_a_child(run_dir, step: int, kill: str = "") -> int:
    """Save step ``step`` in a forked process; its exit code (negative: the signal that ended it)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.environ["VITSCALE_TEST_KILL"] = kill
            Checkpoints(run_dir, keep_last=1, dist=DistEnv()).save(FilesEngine(), step, {"step": step}, META)
        except BaseException:
            code = 1
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.parametrize("point", [p for p in POINTS if p.startswith("save-")])
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
