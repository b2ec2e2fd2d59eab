"""The Slurm launcher's pure parts: time limits, stage chains, sweep points, option checks."""

from __future__ import annotations

import pytest

from launch.spec import SlurmOptions, resolve_options, split_values, sweep_points, time_minutes
from launch.stage import parse_stages
from pretrain.config import ConfigError, for_world_size, load_config


@pytest.mark.parametrize("text, minutes", [
    ("90", 90), ("1:30:00", 90), ("0:00:30", 1), ("10:30", 11), ("2-00:00:00", 2880), ("1-12", 2160), (45, 45)])
def test_time_limits_in_slurm_formats_become_minutes(text, minutes):
    assert time_minutes(text) == minutes


@pytest.mark.parametrize("text", ["", "soon", "1:2:3:4", "0", "-5"])
def test_bad_time_limits_name_the_flag(text):
    with pytest.raises(ConfigError, match="--time"):
        time_minutes(text)


def test_stages_split_on_double_dashes():
    stages = parse_stages(["--", "pretrain", "a.yaml", "x=1", "--", "finetune", "linear", "b.yaml", "y=2"])
    assert [(s.package, s.argv) for s in stages] == [("pretrain", ["a.yaml", "x=1"]),
                                                     ("finetune", ["linear", "b.yaml", "y=2"])]
    assert stages[1].config_path == "b.yaml" and stages[1].overrides == ["y=2"]
    with pytest.raises(ConfigError, match="must start with one of pretrain, finetune"):
        parse_stages(["train", "a.yaml"])
    with pytest.raises(ConfigError, match="no stage given"):
        parse_stages(["--"])


def test_only_top_level_commas_separate_sweep_values():
    assert split_values("0.1,0.2") == ["0.1", "0.2"]
    assert split_values("[0.5,0.5,0.5]") == ["[0.5,0.5,0.5]"]
    assert split_values("{a: 1, b: [1,2]},{a: 2}") == ["{a: 1, b: [1,2]}", "{a: 2}"]


def test_sweep_points_are_the_product_each_in_its_own_run_dir(tmp_path):
    stage = parse_stages(["pretrain", f"run.dir={tmp_path}", "data.synthetic=true", "data.num_classes=2",
                          "train.steps=10", "data.mean=[0.5,0.5,0.5]",
                          "optim.lr=0.1,0.2", "run.seed=0,1,2"])[0]
    points = sweep_points(stage)
    assert len(points) == 6
    label, first = points[0]
    assert label == "optim.lr=0.1_run.seed=0"
    assert first.run_dir() == tmp_path / label
    cfg = first.config()
    assert cfg.optim.lr == 0.1 and cfg.run.seed == 0 and cfg.data.mean == (0.5, 0.5, 0.5)
    assert {p.config().run.seed for _, p in points} == {0, 1, 2}
    no_sweep = parse_stages(["pretrain", f"run.dir={tmp_path}", "data.synthetic=true", "train.steps=1"])[0]
    assert sweep_points(no_sweep) == []


def test_tasks_follow_gpus_unless_given():
    assert SlurmOptions(nodes=2, gpus_per_node=8).world_size == 16
    assert SlurmOptions(gpus_per_node=8, tasks_per_node=1).world_size == 1
    assert SlurmOptions().world_size == 1


def test_profiles_are_checked_and_flags_override_them(tmp_path):
    profile = tmp_path / "c.yaml"
    profile.write_text("nodes: 2\ngpus_per_node: 4\npartition: gpu\n")
    options = resolve_options(str(profile), {"partition": "debug", "nodes": None})
    assert (options.nodes, options.gpus_per_node, options.partition) == (2, 4, "debug")
    profile.write_text("nodez: 2\n")
    with pytest.raises(ConfigError, match=r"unknown launch keys \['nodez'\]"):
        resolve_options(str(profile), {})
    with pytest.raises(ConfigError, match="cannot read launch profile"):
        resolve_options("no-such-cluster", {})
    with pytest.raises(ConfigError, match="--mem='lots'"):
        resolve_options(None, {"mem": "lots"})


def test_a_global_batch_becomes_the_per_process_batch_for_the_world_size():
    cfg = load_config(None, ["data.synthetic=true", "train.steps=1", "data.global_batch=48", "train.grad_accum=2"])
    assert for_world_size(cfg, 4).data.batch_size == 6
    assert for_world_size(cfg, 1).data.batch_size == 24
    with pytest.raises(ConfigError, match="global_batch=48: not divisible by the world size 5 x train.grad_accum 2"):
        for_world_size(cfg, 5)
    plain = load_config(None, ["data.synthetic=true", "train.steps=1", "data.batch_size=8"])
    assert for_world_size(plain, 3).data.batch_size == 8


def test_the_event_log_is_the_launchers_and_old_run_dirs_still_read(tmp_path, capsys):
    import json

    from launch import events
    from launch.status import show

    old = tmp_path / "slurm" / "events.jsonl"  # where run dirs written before the move keep it
    old.parent.mkdir()
    old.write_text(json.dumps({"time": "t", "event": "submitted", "job_id": "1", "command": "python -m pretrain"})
                   + "\n")
    events.record(tmp_path, "failed", job_id="1", error="RuntimeError: boom")
    assert (tmp_path / "launch" / "events.jsonl").is_file()
    assert [e["event"] for e in events.read(tmp_path)] == ["submitted", "failed"]  # oldest first
    assert show(str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "job 1:" in out and "(last event: failed" in out and "last failure: job 1: RuntimeError: boom" in out
    assert show(str(tmp_path / "never-submitted")) == 2
    assert "launch/events.jsonl not found" in capsys.readouterr().err
