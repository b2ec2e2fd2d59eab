"""The README's two commands: the demo runs on a fresh machine, and CI runs exactly the test command."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from packaging.version import Version

from tests.accelerator import answers_of
from tests.conftest import REPO, python_env


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_exactly_the_readme_test_command():
    """Twice, each in a fresh environment: the newest dependencies, then the lowest pyproject allows."""
    demo, tests = readme_commands()[:2]
    ci_lines = [line for line in (REPO / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    runs = [i for i, line in enumerate(ci_lines) if line == tests]
    assert len(runs) == 2
    assert all("rm -rf .venv" in ci_lines[i - 1] for i in runs)  # a fresh virtual environment each time
    constrained = [i for i, line in enumerate(ci_lines) if "PIP_CONSTRAINT" in line and "constraints-lowest.txt" in line]
    assert constrained and runs[0] < constrained[0] < runs[1]
    # One pass with DeepSpeed's accelerator denying fp16, one with it offering fp16 (tests/accelerator.py).
    forced = {i: line.partition("=")[2].strip('"') for i, line in enumerate(ci_lines)
              if line.startswith("export VITSCALE_TEST_ACCELERATOR=")}
    first, second = ([answer for i, answer in forced.items() if lo < i < hi] for lo, hi in ((-1, runs[0]), runs))
    assert [answers_of(a)["fp16"] for a in first + second] == [False, True], forced
    assert demo.endswith(".venv/bin/python -m pretrain")


def test_the_lowest_set_is_what_pyproject_allows():
    """The constraints CI tests pin exactly the lower bounds pyproject.toml declares."""
    pins = dict(line.split("==") for line in (REPO / ".ci/constraints-lowest.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    declared = re.findall(r'"([a-z-]+)>=([\d.]+)"', (REPO / "pyproject.toml").read_text())
    bounds = {name: Version(version) for name, version in declared if name in pins}
    assert set(pins) == {"torch", "torchvision", "timm", "deepspeed"}
    assert bounds == {name: Version(version) for name, version in pins.items()}


def test_demo_runs_from_an_empty_home_and_directory(tmp_path):
    """`python -m pretrain` with no arguments: writes its shards, pre-trains on 2 processes, exports,
    and probes the frozen features against the same model at random initialization; healthy: no
    collapse warning and a clear gain (issue #15). Its next step, `finetune linear` on a demo
    export, runs in test_demo_after.py."""
    env = python_env()
    env["HOME"] = str(tmp_path / "home")  # no demo shards yet: it must write them
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run([sys.executable, "-m", "pretrain"], cwd=work, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    run_dir = work / "runs" / "demo"
    assert (tmp_path / "home/.cache/vitscale/digits/index.json").exists()
    assert (run_dir / "export" / "backbone.safetensors").exists()
    assert f"tensorboard --logdir {Path('runs/demo/tb')}" in result.stdout
    assert json.loads((run_dir / "run.json").read_text())["step"] > 0
    # The ranks log to the demo's stderr, where a collapse warning would be.
    collapse = [line for line in (result.stdout + result.stderr).splitlines() if "possible collapse" in line]
    assert not collapse, "\n".join(collapse[:5])
    probe = re.search(r"pre-trained\s+([\d.]+)%\s+random init\s+([\d.]+)%", result.stdout)
    assert probe, result.stdout[-2000:]
    pretrained, initial = map(float, probe.groups())
    pixels = re.search(r"random init\s+[\d.]+%\s+raw pixels\s+([\d.]+)%", result.stdout)
    assert pixels and float(pixels.group(1)) > 90, result.stdout[-2000:]  # the digits' raw-pixel reference
    # Points of accuracy on the digits' validation split: the demo gives about 79% against 50%
    # (docs/demo.md); DINO's collapsing demo gave 66%, which must fail here.
    assert pretrained >= initial + 15, result.stdout[-2000:]
