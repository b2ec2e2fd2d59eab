"""A wheel, installed into a fresh virtual environment outside the checkout, finds its recipes, and
commands that do not train stay quiet (no DeepSpeed import, so none of its lines).

The wheel is built from a copy of the package sources without build isolation, and installed with
--no-deps; the new environment sees this one's packages (torch, timm, ...) through a .pth file, so
the test needs no network and installs nothing else.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.conftest import REPO, python_env

SOURCES = ["pyproject.toml", "README.md", "pretrain", "finetune", "launch", "configs"]
# DeepSpeed's log lines: "[time] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator ..."
DEEPSPEED_LINE = re.compile(r"\[(DEBUG|INFO|WARNING|ERROR)\] \[\w+\.py:\d+|accelerator")


def run(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """(python of a fresh venv holding the vitscale wheel, its environment)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(
            REPO / name, source / name, **({"symlinks": True, "ignore": shutil.ignore_patterns("__pycache__")}
                                          if (REPO / name).is_dir() else {}))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
        "-w", str(root / "dist"), str(source), cwd=root)
    (wheel,) = (root / "dist").glob("vitscale-*.whl")
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel),
        cwd=root)
    purelib = Path(run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                       cwd=root).stdout.strip())
    # This environment's packages, after the new one's own (so its vitscale is the wheel's).
    (purelib / "outer.pth").write_text(f"{sysconfig.get_paths()['purelib']}\n")
    env = python_env()
    env.pop("PYTHONPATH", None)
    return python, env


def test_the_wheel_ships_the_recipes(installed, tmp_path):
    python, env = installed
    where = run(str(python), "-c", "import pretrain, pretrain.config as c; print(pretrain.__file__); "
                "print(c.load_config(pretrain.DEMO_RECIPE).objective.name)", cwd=tmp_path, env=env).stdout.split()
    assert Path(where[0]).is_relative_to(python.parent.parent) and where[1] == "moby"  # the wheel's, not the checkout's
    out = run(str(python), "-m", "pretrain", "configs/pretrain/dino_swin_tiny.yaml", "--print-config",
              cwd=tmp_path, env=env)
    assert "name: swin_tiny_patch4_window7_224" in out.stdout and "name: dino" in out.stdout  # through its base:
    assert not DEEPSPEED_LINE.search(out.stdout + out.stderr), out.stdout + out.stderr
    pretrained = tmp_path / "weights.safetensors"
    pretrained.write_bytes(b"")
    out = run(str(python), "-m", "finetune", "linear", "configs/finetune/linear_demo.yaml", f"pretrained={pretrained}",
              "--print-config", cwd=tmp_path, env=env)
    assert "epochs: 30" in out.stdout and not DEEPSPEED_LINE.search(out.stdout + out.stderr), out.stderr
    out = run(str(python), "-m", "launch", "slurm", "--profile", "local-cpu", "--dry-run", "--",
              "pretrain", "configs/pretrain/demo.yaml", cwd=tmp_path, env=env)
    assert "#SBATCH" in out.stdout


def test_commands_that_do_not_train_do_not_import_deepspeed(installed, tmp_path):
    """--print-config, a bad key, a missing recipe: answered without DeepSpeed, so without its lines."""
    python, env = installed
    check = ("import sys\nfrom pretrain.__main__ import main\n"
             "codes = [main(['configs/pretrain/demo.yaml', '--print-config']), main(['optim.lrr=1']),\n"
             "         main(['configs/pretrain/nothing.yaml'])]\n"
             "print(codes, sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed'))")
    out = run(str(python), "-c", check, cwd=tmp_path, env=env)
    assert out.stdout.strip().splitlines()[-1] == "[0, 2, 2] []", out.stdout
    assert "optim.lrr" in out.stderr and "configs/pretrain/nothing.yaml" in out.stderr, out.stderr
    assert not DEEPSPEED_LINE.search(out.stderr), out.stderr
