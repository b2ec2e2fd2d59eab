"""The latest pointer and keep-last-K pruning, on the files alone."""

import pytest

from pretrain.dist import DistEnv
from pretrain.files import atomic_path, atomic_write
from pretrain.state.checkpoints import Checkpoints
from pretrain.state.layout import tag_for


def make(directory, steps):
    for step in steps:
        (directory / tag_for(step)).mkdir(parents=True)
        (directory / tag_for(step) / "weights").write_text(str(step))


def test_prune_keeps_the_newest_and_never_the_pointer_target(tmp_path):
    ckpts = Checkpoints(tmp_path, keep_last=2, dist=DistEnv())
    make(ckpts.directory, [100, 200, 300, 400])
    atomic_write(ckpts.directory / "latest", tag_for(300).encode())
    ckpts.prune(keep=tag_for(300))
    # 400 is newer than what "latest" names: a save that never completed, so it goes too.
    assert sorted(p.name for p in ckpts.directory.iterdir() if p.is_dir()) == [tag_for(200), tag_for(300)]
    assert ckpts.latest() == tag_for(300)


def test_keep_last_one_keeps_only_the_latest(tmp_path):
    ckpts = Checkpoints(tmp_path, keep_last=1, dist=DistEnv())
    make(ckpts.directory, [1, 2])
    ckpts.prune(keep=tag_for(2))
    assert [p.name for p in ckpts.directory.iterdir() if p.is_dir()] == [tag_for(2)]


def test_latest_is_none_for_a_fresh_run_and_an_error_when_dangling(tmp_path):
    ckpts = Checkpoints(tmp_path, keep_last=2, dist=DistEnv())
    assert ckpts.latest() is None
    ckpts.directory.mkdir()
    atomic_write(ckpts.directory / "latest", tag_for(5).encode())
    with pytest.raises(RuntimeError, match="step_00000005"):
        ckpts.latest()


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write(tmp_path / "latest", b"step_00000001")
    atomic_write(tmp_path / "latest", b"step_00000002")
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]
    assert (tmp_path / "latest").read_text() == "step_00000002"


def test_a_writer_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "backbone.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of the new")
            raise OSError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["backbone.safetensors"]
    assert target.read_bytes() == b"old"


def test_saves_are_due_every_n_steps_on_a_stop_request_and_once_at_the_end(tmp_path):
    from tests.unit.test_checkpoint_faults import META, FilesEngine

    ckpts = Checkpoints(tmp_path, keep_last=2, dist=DistEnv(), every=3)
    assert [s for s in range(1, 10) if ckpts.due(s)] == [3, 6, 9]
    assert ckpts.due(4, stop_requested=True) and ckpts.due(4, last=True)
    ckpts.save(FilesEngine(), 4, {"step": 4}, META)
    assert not ckpts.due(4, last=True)  # just saved: the end of the invocation does not save it again
    assert ckpts.due(5, last=True)
    never = Checkpoints(tmp_path, keep_last=2, dist=DistEnv(), every=0)
    assert not any(never.due(s) for s in range(1, 10)) and never.due(9, last=True)
