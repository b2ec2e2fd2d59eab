"""Faults injected for real into 2-process runs through `python -m launch local`: a rank SIGKILLed
mid-step, ranks SIGKILLed inside a checkpoint save (VITSCALE_TEST_KILL, see tests/faults.py), a
full disk (a size-limited tmpfs), and broken or foreign checkpoints. docs/reliability.md lists what
each test shows.

Every run is the same tiny fp32 ZeRO-1 job (8 steps, a checkpoint every 2, keep_last=1); the
uninterrupted one is trained once and serves as the reference for the weights of every resumed run.
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.dist import DistEnv
from pretrain.state.checkpoints import Checkpoints
from pretrain.state.layout import file_checksum, tag_for
from tests.conftest import QUIET, REPO, TINY_VIT, flip_bytes, python_env, run_module, write_code_payload
from tests.faults import fault_env

RECIPE = str(REPO / "configs/pretrain/digits_supervised.yaml")
JOB = [*QUIET, *TINY_VIT, "engine.precision=fp32", "engine.zero_stage=1", "train.epochs=null", "train.steps=8",
       "train.ckpt_every=2", "train.keep_last=1", "train.log_every=1", "train.eval_every=0", "data.batch_size=16",
       "optim.warmup_steps=2", "data.val=null", "data.prepare=none"]


def launch(run_dir: Path, digits: Path, kill: str = "", limit_file_size: int | None = None, timeout: float = 300,
           extra: list[str] = ()):
    """`python -m launch local --nproc 2` on the job; ``kill``: VITSCALE_TEST_KILL for the ranks;
    ``limit_file_size``: no file written may grow beyond this many bytes (EFBIG, not SIGXFSZ).
    Returns (exit code, stderr, seconds from the kill to the launcher's exit or None)."""
    env = fault_env(python_env(), VITSCALE_TEST_KILL=kill)
    command = [sys.executable, "-m", "launch", "local", "--nproc", "2", RECIPE, f"run.dir={run_dir}",
               f"data.train={digits}", *JOB, *extra]
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited: writes fail with an OSError instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=limit if limit_file_size else None)
    lines, killed_at = [], None
    deadline = time.monotonic() + timeout
    for line in proc.stderr:
        lines.append(line)
        if killed_at is None and line.startswith("[VITSCALE_TEST_KILL]"):
            killed_at = time.monotonic()
        assert time.monotonic() < deadline, "".join(lines[-50:])
    code = proc.wait()
    return code, "".join(lines), None if killed_at is None else time.monotonic() - killed_at


def exported(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "export" / "backbone.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = exported(a), exported(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def checkpoint_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


def latest(run_dir: Path) -> str:
    return Checkpoints(run_dir, 1, DistEnv()).latest()


def read_meta(run_dir: Path, tag: str) -> dict:
    return json.loads((run_dir / "checkpoints" / tag / "meta.json").read_text())


@pytest.fixture(scope="module")
def whole(tmp_path_factory, digits_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("faults") / "whole"
    code, err, _ = launch(run_dir, digits_dir)
    assert code == 0, err[-5000:]
    return run_dir


@dataclass
class Attempt:
    code: int
    stderr: str
    after_kill: float | None  # seconds from the kill to the launcher's exit
    latest: str | None
    dirs: list[str]  # checkpoint directories afterwards
    resumed_from: str | None


# One run dir, four invocations: a rank dies mid-step; the rerun loses rank 0 inside a save, after
# every rank wrote step 4's files but before ``latest`` moved; the next rerun loses rank 1 inside a
# save, after it wrote its part of step 6; the last one finishes.
KILLS = ["step:1:3", "save-before-latest:0:4", "save-after-write:1:6", ""]


@pytest.fixture(scope="module")
def interrupted(whole, digits_dir, tmp_path_factory) -> tuple[Path, list[Attempt]]:
    run_dir = tmp_path_factory.mktemp("faults") / "interrupted"
    attempts = []
    for kill in KILLS:
        code, err, after_kill = launch(run_dir, digits_dir, kill=kill)
        summary = json.loads((run_dir / "run.json").read_text())
        attempts.append(Attempt(code, err, after_kill, latest(run_dir), checkpoint_dirs(run_dir),
                                summary["resumed_from"]))
    return run_dir, attempts


def test_a_killed_rank_ends_the_job_with_a_message_naming_it(interrupted):
    _, (killed, *_) = interrupted
    assert killed.code != 0
    assert killed.after_kill is not None and killed.after_kill < 60, killed.stderr[-3000:]
    assert "error: rank 1 (pid " in killed.stderr and "died: killed by SIGKILL" in killed.stderr, killed.stderr[-3000:]
    assert killed.latest == tag_for(2) and killed.dirs == [tag_for(2)]


def test_ranks_killed_inside_a_save_leave_the_previous_checkpoint(interrupted):
    _, (_, rank0, rank1, _) = interrupted
    assert rank0.code != 0 and "error: rank 0 (pid " in rank0.stderr, rank0.stderr[-3000:]
    assert rank0.resumed_from == tag_for(2)
    # keep_last=1: the only complete checkpoint survives; step 4, written but not named, is not used.
    assert rank0.latest == tag_for(2) and rank0.dirs == [tag_for(2), tag_for(4)]
    assert rank1.code != 0 and "error: rank 1 (pid " in rank1.stderr, rank1.stderr[-3000:]
    assert rank1.resumed_from == tag_for(2)
    assert rank1.latest == tag_for(4) and tag_for(4) in rank1.dirs and tag_for(2) not in rank1.dirs


def test_reruns_resume_and_end_with_the_weights_of_an_uninterrupted_run(interrupted, whole):
    run_dir, (*_, last) = interrupted
    assert last.code == 0, last.stderr[-5000:]
    assert last.resumed_from == tag_for(4) and last.dirs == [tag_for(8)]
    assert_same_weights(run_dir, whole)


def _directory_bytes(path: Path) -> int:
    """Bytes ``path``'s files take on a tmpfs (whole pages)."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in path.rglob("*") if f.is_file())


def test_a_full_disk_fails_the_save_cleanly(whole, digits_dir, tmp_path):
    """The run's checkpoints dir is a tmpfs with room for one checkpoint and a half: step 2's save
    fits, step 4's does not (step 2 is kept until step 4 is complete). Where mounting is not
    permitted (not root; CI runs as root), the fallback is a file-size limit (RLIMIT_FSIZE) below
    the largest checkpoint file: then already step 2's save fails, and there is no previous
    checkpoint to keep."""
    run_dir = tmp_path / "disk-full"
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    one = _directory_bytes(whole / "checkpoints" / tag_for(8))
    rest = _directory_bytes(whole / "checkpoints") - one  # DeepSpeed's recovery scripts, latest
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={rest + one * 3 // 2}", "tmpfs", str(ckpts)],
                             capture_output=True, text=True).returncode == 0
    try:
        if mounted:
            code, err, _ = launch(run_dir, digits_dir)
            failed, kept = tag_for(4), tag_for(2)
        else:
            print(f"cannot mount a tmpfs at {ckpts}: testing with a file-size limit instead")
            largest = max(f.stat().st_size for f in (whole / "checkpoints" / tag_for(8)).iterdir())
            code, err, _ = launch(run_dir, digits_dir, limit_file_size=largest // 2)
            failed, kept = tag_for(2), None
        assert code != 0
        assert "could not write checkpoint" in err and str(ckpts / failed) in err, err[-5000:]
        assert f"still names the last complete checkpoint, {kept or 'none'}" in err, err[-5000:]
        assert latest(run_dir) == kept
        assert checkpoint_dirs(run_dir) == ([kept] if kept else [])  # the partial save was removed
        if mounted:
            assert "(the file system is full: " in err, err[-5000:]
            # The checkpoint left is whole (resuming from one that survived is shown above).
            Checkpoints(run_dir, 1, DistEnv()).verify(kept, read_meta(whole, tag_for(8)))
    finally:
        if mounted:
            subprocess.run(["umount", str(ckpts)], check=True)


def test_broken_and_foreign_checkpoints_are_refused_before_anything_is_loaded(whole, digits_dir, tmp_path):
    cases = {}
    data = [f"data.train={digits_dir}", "data.prepare=none", "data.workers=0", "run.threads=1"]
    damaged = ["truncated", "flipped", "missing-shard", "latest-not-utf8", "payload-copied-meta",
               "payload-rehashed-meta"]
    for name, recipe, overrides in [
        *((name, RECIPE, JOB) for name in damaged),
        ("other-model", RECIPE, [*JOB, "model.kwargs={patch_size: 4, embed_dim: 48, depth: 2, num_heads: 2}"]),
        ("other-objective", str(REPO / "configs/pretrain/dino_demo.yaml"), ["train.epochs=null", "train.steps=8"]),
    ]:
        run_dir = tmp_path / name
        shutil.copytree(whole, run_dir)
        cases[name] = (recipe, [*overrides, *data, f"run.dir={run_dir}"])

    def tag_dir(case: str) -> Path:
        return tmp_path / case / "checkpoints" / tag_for(8)

    model_file = tag_dir("truncated") / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:model_file.stat().st_size // 2])
    flip_bytes(tag_dir("flipped") / "mp_rank_00_model_states.pt")
    (tag_dir("missing-shard") / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    (tmp_path / "latest-not-utf8" / "checkpoints" / "latest").write_bytes(b"\xff\xfe")
    markers = {}
    for case in ("payload-copied-meta", "payload-rehashed-meta"):  # a crafted file in place of the model states
        markers[case] = tmp_path / f"{case}.ran"
        write_code_payload(tag_dir(case) / "mp_rank_00_model_states.pt", markers[case])
    meta = read_meta(tmp_path / "payload-rehashed-meta", tag_for(8))
    meta["files"]["mp_rank_00_model_states.pt"] = file_checksum(tag_dir("payload-rehashed-meta") /
                                                                "mp_rank_00_model_states.pt")
    (tag_dir("payload-rehashed-meta") / "meta.json").write_text(json.dumps(meta))

    result = tmp_path / "result.json"
    run_module("tests.integration.fault_resume_worker", str(result), json.dumps(cases))
    results = json.loads(result.read_text())
    for name, outcome in results.items():
        assert outcome["error"] and outcome["error"].startswith("CheckpointError"), (name, outcome)
        assert outcome["untouched"] and outcome["step"] == 0, (name, outcome)
    assert f"{model_file}: truncated or corrupt" in results["truncated"]["error"]
    assert (f"{tag_dir('flipped') / 'mp_rank_00_model_states.pt'}: corrupt: its sha256 differs"
            in results["flipped"]["error"])
    assert f"{tag_dir('missing-shard') / 'zero_pp_rank_1_mp_rank_00_optim_states.pt'}: missing" in \
        results["missing-shard"]["error"]
    assert f"{tmp_path / 'latest-not-utf8' / 'checkpoints' / 'latest'}: not a checkpoint tag" in \
        results["latest-not-utf8"]["error"]
    # A copied meta.json does not fit the crafted file; one rewritten to fit it still loads nothing
    # but weights. Either way the payload never runs.
    assert f"{tag_dir('payload-copied-meta') / 'mp_rank_00_model_states.pt'}: truncated or corrupt" in \
        results["payload-copied-meta"]["error"]
    assert (f"{tag_dir('payload-rehashed-meta') / 'mp_rank_00_model_states.pt'}: refused: loading it would "
            f"unpickle more than weights" in results["payload-rehashed-meta"]["error"])
    assert not any(marker.exists() for marker in markers.values())
    meta = str(tmp_path / "other-model" / "checkpoints" / tag_for(8) / "meta.json")
    assert results["other-model"]["error"].startswith(f"CheckpointError: {meta}: written with model_kwargs")
    assert "written with objective 'supervised', this run has 'dino'" in results["other-objective"]["error"]


def test_flipped_bytes_stop_a_rerun_before_it_trains(whole, digits_dir, tmp_path):
    """The issue's reproduction through the launcher: bytes flipped in the largest file of the latest
    checkpoint; the rerun refuses it naming the file, without a traceback, and trains nothing."""
    run_dir = tmp_path / "flipped"
    shutil.copytree(whole, run_dir)
    tag = run_dir / "checkpoints" / tag_for(8)
    victim = max(tag.glob("*.pt"), key=lambda f: f.stat().st_size)
    flip_bytes(victim)
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    code, err, _ = launch(run_dir, digits_dir, extra=["train.steps=10"])
    assert code == 1, err[-3000:]
    assert f"error: {victim}: corrupt: its sha256 differs" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before and latest(run_dir) == tag_for(8)


def test_a_crafted_checkpoint_given_as_pretrained_runs_nothing(whole, digits_dir, tmp_path):
    """``python -m finetune ... pretrained=DIR`` on a DeepSpeed directory whose model states would run
    code when unpickled: refused naming the file, nothing runs. Without vitscale's meta.json there is
    no checksum to catch it first; with a copied one, the checksum does."""
    from finetune import weights

    crafted = tmp_path / "crafted"
    shutil.copytree(whole / "checkpoints" / tag_for(8), crafted / tag_for(8))
    (crafted / "latest").write_text(tag_for(8))
    victim = crafted / tag_for(8) / "mp_rank_00_model_states.pt"
    marker = tmp_path / "payload-ran"
    write_code_payload(victim, marker)

    with pytest.raises(weights.WeightsError, match=f"^{victim}: truncated or corrupt"):
        weights.read(crafted)  # meta.json copied along: its checksums do not fit
    (crafted / tag_for(8) / "meta.json").unlink()  # a foreign DeepSpeed directory
    result = run_module("finetune", "linear", "configs/finetune/linear_demo.yaml", f"pretrained={crafted}",
                        f"run.dir={tmp_path / 'probe'}", f"data.train={digits_dir}", f"data.val={digits_dir}",
                        "data.prepare=none", "data.workers=0", *TINY_VIT, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: {victim}: refused: loading it would unpickle more than weights" in result.stderr, \
        result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not marker.exists()
