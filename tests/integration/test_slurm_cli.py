"""``python -m launch slurm`` before submission: --dry-run's sbatch script and config, and the errors that
stop a submission (unknown partition from the real ``sinfo``, missing shards, an indivisible global batch)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from launch.__main__ import main
from tests.conftest import QUIET, REPO, TINY_VIT

RECIPE = str(REPO / "configs" / "pretrain" / "digits_supervised.yaml")


@pytest.fixture(scope="module", autouse=True)
def slurm_up():
    if shutil.which("sinfo") is None or subprocess.run(["sinfo"], capture_output=True).returncode:
        pytest.fail("Slurm is not up: run .ci/slurm-up (as root) first")


def pretrain(digits_dir, run_dir, *extra):
    return ["pretrain", RECIPE, f"run.dir={run_dir}", f"data.train={digits_dir}", f"data.val={digits_dir}",
            *TINY_VIT, *QUIET, "train.epochs=null", "train.steps=5", *extra]


def test_dry_run_prints_the_sbatch_script_and_the_resolved_config(digits_dir, tmp_path, capsys):
    code = main(["slurm", "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "8", "--mem", "64G",
                 "--partition", "debug", "--account", "vision", "--qos", "high", "--constraint", "a100",
                 "--exclude", "node7", "--time", "1-02:30:00", "--job-name", "vit-l", "--dry-run", "--",
                 *pretrain(digits_dir, tmp_path / "run", "data.batch_size=8")])
    out = capsys.readouterr().out
    assert code == 0
    run_dir = tmp_path / "run"
    for directive in ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--mem=64G",
                      "--partition=debug", "--account=vision", "--qos=high", "--constraint=a100",
                      "--exclude=node7", "--time=1590", "--job-name=vit-l", "--requeue", "--signal=USR2@120",
                      f"--output={run_dir}/slurm/%j_0_log.out", "--open-mode=append"]:
        assert f"#SBATCH {directive}\n" in out, directive
    assert "srun --unbuffered" in out and "--kill-on-bad-exit=1" in out and "torchrun" not in out
    assert "  batch_size: 8\n" in out and f"  dir: {run_dir}\n" in out  # the resolved config follows
    assert not run_dir.exists()  # nothing was written, nothing submitted


def test_dry_run_of_a_chain_and_a_sweep(digits_dir, tmp_path, capsys):
    assert main(["slurm", "--tasks-per-node", "2", "--dry-run", "--", *pretrain(digits_dir, tmp_path / "a"),
                 "--", *pretrain(digits_dir, tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert out.count("#!/bin/bash") == 2 and "#SBATCH --dependency=afterok:JOB0" in out

    assert main(["slurm", "--dry-run", "--", *pretrain(digits_dir, tmp_path / "s", "optim.lr=0.001,0.002",
                                                        "train.steps=3,4")]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-3%4" in out
    for label in ["optim.lr=0.001_train.steps=3", "optim.lr=0.002_train.steps=4"]:
        assert f"# run dir: {tmp_path / 's' / label}\n" in out


def test_a_profile_supplies_the_options_and_flags_override_it(digits_dir, tmp_path, capsys):
    profile = tmp_path / "cluster.yaml"
    profile.write_text("partition: debug\ngpus_per_node: 8\ncpus_per_task: 10\nsetup: ['module load cuda']\n")
    assert main(["slurm", "--profile", str(profile), "--cpus-per-task", "6", "--dry-run", "--",
                 *pretrain(digits_dir, tmp_path / "run", "data.batch_size=2")]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --ntasks-per-node=8\n" in out and "#SBATCH --cpus-per-task=6\n" in out
    assert "\nmodule load cuda\n" in out
    profile.write_text("gpus: 8\n")
    assert main(["slurm", "--profile", str(profile), "--dry-run", "--", *pretrain(digits_dir, tmp_path / "r")]) == 2
    assert "unknown launch keys ['gpus']" in capsys.readouterr().err


@pytest.mark.parametrize("flags, extra, message", [
    (["--partition", "nosuch"], [], "--partition='nosuch': no such partition on this cluster (sinfo lists: debug)"),
    (["--tasks-per-node", "3"], ["data.global_batch=64"],
     "data.global_batch=64: not divisible by the world size 3 x train.grad_accum 1"),
    (["--time", "soon"], [], "--time='soon'"),
])
def test_bad_options_fail_before_submission(digits_dir, tmp_path, capsys, flags, extra, message):
    assert main(["slurm", *flags, "--", *pretrain(digits_dir, tmp_path / "run", *extra)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_shards_fail_before_submission(tmp_path, capsys):
    missing = tmp_path / "shards-{000..001}.tar"
    assert main(["slurm", "--", "pretrain", RECIPE, f"run.dir={tmp_path / 'run'}", "data.prepare=none",
                 f"data.train={missing}", "data.val=null", "data.num_classes=10"]) == 2
    err = capsys.readouterr().err
    assert "data.train: 2 of 2 shards are missing" in err and "shards-000.tar" in err
