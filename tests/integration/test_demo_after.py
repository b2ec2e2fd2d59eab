"""The README's after-demo commands (finetune linear, knn and full on the demo's export) each print
where their number stands: the same recipe on the same model at random init, and a logistic
regression on the raw pixels; full fine-tuning learns the digits and beats its random-init run."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import REPO, run_module

pytestmark = pytest.mark.slow

REFERENCE = re.compile(r"pre-trained\s+([\d.]+)%.*\n\s+random init\s+([\d.]+)%.*\n\s+raw pixels\s+([\d.]+)%")
# A shortened demo: its export is what the commands read; its quality is the demo test's business.
SHORT_DEMO = ["train.epochs=2", "train.progress=false", "train.ckpt_every=0", "data.workers=0",
              "data.batch_size=64"]


@pytest.fixture(scope="module")
def after_demo(tmp_path_factory, digits_dir) -> tuple:
    """(work dir, {stage: (pre-trained, random init, raw pixels) top-1 as printed}) of the three commands
    on a shortened demo's export."""
    tmp_path = tmp_path_factory.mktemp("after_demo")
    demo = tmp_path / "demo"
    run_module("pretrain", str(REPO / "configs/pretrain/demo.yaml"), f"run.dir={demo}", f"data.train={digits_dir}",
               *SHORT_DEMO)
    printed = {}
    for stage, extra in (("linear", ["linear.epochs=10"]), ("knn", []), ("full", ["train.progress=false"])):
        result = run_module("finetune", stage, str(REPO / f"configs/finetune/{stage}_demo.yaml"), f"pretrained={demo}",
                            f"run.dir={tmp_path / stage}", f"data.train={digits_dir}", f"data.val={digits_dir}",
                            "data.workers=0", *extra)
        found = REFERENCE.search(result.stdout)
        assert found, f"{stage}: no reference lines in\n{result.stdout[-3000:]}"
        printed[stage] = tuple(map(float, found.groups()))
    return tmp_path, printed


def test_after_demo_commands_print_their_references(after_demo):
    tmp_path, printed = after_demo
    for stage in ("linear", "knn", "full"):
        assert (tmp_path / stage / "random-init").is_dir(), stage  # the reference run has its own run dir
        assert printed[stage][2] > 90, (stage, printed[stage])  # raw digits: ~96% for a logistic regression
    for stage in ("linear", "knn"):  # what the printed lines say is what the report holds
        report = json.loads((tmp_path / stage / f"{stage}.json").read_text())
        assert abs(report["best_top1"] - printed[stage][0]) < 0.06, (report["best_top1"], printed[stage])
    assert printed["linear"][0] > 30, printed["linear"]  # percent; chance is 10


# Issue #20's bar: from this 2-epoch MoBY demo export full_demo gave 83.6% against 77.4% from random
# init (1 process, docs/demo.md); from a 2-epoch DINO demo export it gave 72.1%, which must fail here.
def test_full_fine_tuning_learns_and_beats_random_init(after_demo):
    pretrained, random_init, _ = after_demo[1]["full"]
    assert pretrained >= 80, after_demo[1]["full"]
    assert pretrained > random_init, after_demo[1]["full"]
