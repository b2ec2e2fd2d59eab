"""Shared fixtures: tiny shards written on the fly, tiny models, and runs through the real entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.accelerator import force_accelerator, force_for_session  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parent.parent
force_for_session()

# A tiny ViT and a tiny Swin for 32x32 digits: seconds per run on a CPU.
TINY_VIT = ["model.name=vit_tiny_patch16_224",
            "model.kwargs={patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2.0}"]
TINY_SWIN = ["model.name=swin_tiny_patch4_window7_224",
             "model.kwargs={patch_size: 2, window_size: 4, embed_dim: 16, depths: [1, 1], num_heads: [1, 2]}"]
# Deterministic, light training settings shared by the integration tests.
QUIET = ["run.threads=1", "train.progress=false", "data.workers=0", "objective.mixup=0", "objective.cutmix=0",
         "objective.reprob=0", "objective.auto_augment=null", "objective.hflip=0", "model.drop_path=0",
         "data.image_size=32", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"]


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    """The suite has ended: if the process then does not exit within two minutes, print every
    thread's stack and exit non-zero. A data worker that outlived its test once held pytest in
    multiprocessing's exit hook until CI's time ran out, after every test had passed."""
    import faulthandler

    faulthandler.dump_traceback_later(120, exit=True, file=sys.__stderr__)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """scikit-learn's digits as shards (train and val splits with an index), written once per session."""
    from pretrain.data.builtin import prepare

    out = tmp_path_factory.mktemp("digits") / "shards"
    prepare("digits", out)
    return out


def python_env(threads: int = 1) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    # DeepSpeed compiles a small CPU op on first use; one build cache per virtualenv keeps two
    # environments (say a checkout's and CI's) from rebuilding it over each other.
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def worker_env() -> dict:
    """:func:`python_env` for a worker script of tests/integration: it imports the tests package,
    which only the checkout has (the installed project does not ship it)."""
    return dict(python_env(), PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def run_worker(name: str, *args: str, nproc: int = 2, env: dict | None = None, timeout: float = 600) -> None:
    """``tests/integration/NAME.py args`` on ``nproc`` processes under torchrun (standalone), in ``env``
    (default :func:`worker_env`); a failure shows the ranks' error lines, or the end of stderr."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(REPO / "tests/integration" / f"{name}.py"), *args]
    done = subprocess.run(command, cwd=REPO, env=env or worker_env(), capture_output=True, text=True, timeout=timeout)
    errors = [line for line in done.stderr.splitlines() if "Error" in line and "[rank" in line]
    assert done.returncode == 0, "\n".join(errors[:10]) or done.stderr[-8000:]


def run_module(module: str, *args: str, timeout: float = 600, check: bool = True,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m module args`` from the repository root, as a user would run it (in ``env``, by
    default :func:`python_env`'s)."""
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env or python_env(),
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"python -m {module} {' '.join(args)} exited {result.returncode}\n"
                             f"--- stdout\n{result.stdout[-5000:]}\n--- stderr\n{result.stderr[-8000:]}")
    return result


def load_export(run_dir: Path):
    """A run's export as README.md loads it: (backbone.json, the exported tensors, the timm model
    built from the file). num_classes goes in the overlay, or timm takes the file for one with the
    hub's 1000-class head and keeps a random head; custom_load=False, or timm 1.0.15 reads it as the
    hub's .npz."""
    import timm

    from pretrain.export import read_meta, read_weights

    export = Path(run_dir) / "export"
    meta = read_meta(export)
    weights = export / meta["weights"]
    overlay = dict(file=str(weights), num_classes=meta["kwargs"]["num_classes"], custom_load=False)
    model = timm.create_model(meta["model"], pretrained=True, pretrained_cfg_overlay=overlay, **meta["kwargs"])
    return meta, read_weights(weights), model.eval()


class _RunsCode:
    """Pickled, it makes the unpickler call ``os.system(command)``: what a crafted checkpoint does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def write_code_payload(path: Path, marker: Path) -> None:
    """Replace the torch file ``path`` by one shaped like a DeepSpeed model-states file whose loading,
    unless weights-only, creates ``marker``."""
    import torch

    torch.save({"module": {}, "payload": _RunsCode(f"touch {marker}")}, path)


def flip_bytes(path: Path, count: int = 8) -> None:
    """XOR ``count`` bytes in the middle of ``path``: its size stays, its zip directory stays intact."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))
