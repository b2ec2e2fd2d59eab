"""engine.compile for every objective, on 1 process at ZeRO-0 in fp32: 10 steps of the Trainer
compiled give the eager run's losses, the compiled step is one graph without a break (per-step
schedules, masks and queue positions enter it as tensors: no graph per step), and a compiled run's
checkpoint and export hold the eager run's keys.

Most objectives compile with aot_eager: it traces the whole forward and backward as inductor does
(graph breaks, buffer mutations, AOTAutograd's backward) but runs eager's kernels, without code
generation, which costs a minute per graph on a small CPU; their losses must then be eager's to
the bit. One objective compiles with inductor, whose generated kernels sum in other orders: its
losses agree within fp32 rounding carried through 10 Adam steps (rtol 1e-4; measured 2e-7).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY_VIT, worker_env
from tests.helpers import TINY_DINO, TINY_DINOV2, TINY_MOBY

pytestmark = pytest.mark.slow

ONE_BLOCK = "model.kwargs.depth=1"  # the tiny ViT with one block: the compile time is the test's time
RUN = ["data.synthetic=true", "data.num_classes=10", "data.image_size=32", "data.batch_size=4", "train.steps=10",
       "train.log_every=1", "train.ckpt_every=0", "engine.precision=fp32", "engine.zero_stage=0", "run.threads=1",
       "train.progress=false", "data.workers=0"]
# backend, overrides. Supervised keeps its recipe's device-side Mixup, CutMix and erasing; MoBY's
# queue of 12 keys wraps around every 3 steps; DINOv2 centres by Sinkhorn-Knopp over padded rows.
# Colour jitter (a third of DINO's compile time) is left to MoBY's views and to
# tests/unit/test_device_augmentation.py.
NO_JITTER = "objective.jitter=0"
CASES = {
    "supervised": ("inductor", [*TINY_VIT, ONE_BLOCK]),
    "dino": ("aot_eager", [*TINY_DINO, ONE_BLOCK, NO_JITTER, "objective.freeze_last_layer_epochs=0"]),
    "moby": ("aot_eager", TINY_MOBY),
    "simmim": ("aot_eager", [*TINY_VIT, ONE_BLOCK, "objective.name=simmim", "objective.mask_patch_size=8"]),
    "dinov2": ("aot_eager", [*TINY_DINOV2, ONE_BLOCK, NO_JITTER, "objective.centering=sinkhorn_knopp"]),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compile")
    cases = {name: (backend, [*RUN, *overrides]) for name, (backend, overrides) in CASES.items()}
    result = tmp / "result.json"
    done = subprocess.run([sys.executable, str(REPO / "tests/integration/compile_worker.py"), str(tmp), str(result),
                           json.dumps(cases)], cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-8000:]
    return json.loads(result.read_text())


@pytest.mark.parametrize("name", CASES)
def test_compiled_steps_give_the_eager_losses_in_one_graph(results, name):
    eager, compiled = results[name]["eager"], results[name]["compiled"]
    assert compiled["graph_breaks"] == 0, compiled["break_reasons"]
    assert compiled["graphs"] == 1  # the same graph all 10 steps
    assert eager["graphs"] == 0  # and the eager run compiled nothing
    assert sorted(eager["losses"], key=int) == sorted(compiled["losses"], key=int) == [str(s) for s in range(1, 11)]
    expected = list(eager["losses"].values())
    assert expected[0] != expected[-1]  # the weights moved: later steps compare updated models
    if CASES[name][0] == "inductor":
        assert list(compiled["losses"].values()) == pytest.approx(expected, rel=1e-4)
    else:
        assert compiled["losses"] == eager["losses"]


@pytest.mark.parametrize("name", CASES)
def test_a_compiled_run_checkpoints_and_exports_the_same_keys(results, name):
    eager, compiled = results[name]["eager"], results[name]["compiled"]
    assert compiled["checkpoint_keys"] == eager["checkpoint_keys"] and eager["checkpoint_keys"]
    assert compiled["export_keys"] == eager["export_keys"] and eager["export_keys"]
    assert not any("_orig_mod" in key for key in compiled["checkpoint_keys"])
