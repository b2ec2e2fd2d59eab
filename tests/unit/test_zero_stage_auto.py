"""engine.zero_stage=auto: the memory model it weighs stages with, the stage it picks for forced
device memory and world sizes and why, the config key, and a tiny run that records its choice and
keeps the stage of the checkpoint it resumes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from pretrain.config import ConfigError, load_config
from pretrain.dist import DistEnv
from pretrain.engine.memory_model import activation_bytes, model_state_bytes, teacher_state_bytes
from pretrain.objectives.base import RunContext
from pretrain.zero_stage import (MEMORY_MARGIN, Budget, Workload, choose_zero_stage, device_budget, measure_workload,
                                 needs, recorded_stage, resolve_zero_stage)
from tests.conftest import REPO, TINY_VIT, python_env
from tests.helpers import TINY_DINO, synthetic_config

GIB = 2**30
H100 = Budget(80 * GIB, "free on cuda:0")


def workload(trainable: float, frozen: float = 0, units=(), batch: int = 1, precision: str = "bf16",
             checkpointing: bool = False) -> Workload:
    return Workload(int(trainable), int(frozen), list(units), batch, precision, checkpointing)


# -- the memory model ----------------------------------------------------------------------------------
@pytest.mark.parametrize("ranks", [1, 2, 8])
def test_16_bit_weights_follow_the_zero_paper_and_fp32_weights_add_their_copy(ranks):
    paper = {0: 16, 1: 4 + 12 / ranks, 2: 2 + 14 / ranks, 3: 16 / ranks}
    fp32 = {0: 16, 1: 8 + 12 / ranks, 2: 4 + 16 / ranks, 3: 20 / ranks}
    for stage in range(4):
        assert model_state_bytes(stage, ranks, autocast=False).total == pytest.approx(paper[stage])
        assert model_state_bytes(stage, ranks, autocast=True).total == pytest.approx(fp32[stage])
    # Offload takes the fp32 masters and Adam's moments off the device; "all" ZeRO-3's weights too.
    assert model_state_bytes(2, ranks, False, "optimizer").total == pytest.approx(2 + 2 / ranks)
    assert model_state_bytes(3, ranks, False, "all").total == pytest.approx(2 / ranks)


def test_a_teacher_state_is_partitioned_only_at_zero3_and_exchanged_at_zero1_and_2():
    assert [teacher_state_bytes(s, 4) for s in range(4)] == [4, 4 + 4 + 1, 4 + 4 + 1, 1]


def test_checkpointing_keeps_block_inputs_and_one_rebuilt_block():
    units = [100, 100, 50]  # tokens x width at three blocks
    assert activation_bytes(units, 2, fp32_compute=True, checkpointing=False) == 2 * 72 * 250
    assert activation_bytes(units, 2, fp32_compute=False, checkpointing=False) == 2 * 40 * 250
    assert activation_bytes(units, 2, fp32_compute=True, checkpointing=True) == 2 * (8 * 250 + 72 * 100)


# -- the choice -----------------------------------------------------------------------------------------
def test_picks_the_lowest_stage_that_fits_and_says_why():
    # 5B parameters on 8 GPUs: ZeRO-0 needs 16 B each (74.5 GiB) and autocast's 16-bit copies (9.3 GiB)
    # on 80 GiB x 0.9; ZeRO-1 4 + 4 + 12/8 B (44.2 GiB).
    choice = choose_zero_stage(workload(5e9), 8, H100)
    assert choice.stage == 1 and choice.fits
    assert choice.reason == ("engine.zero_stage=auto: ZeRO-1 (ZeRO-0 needs 74.5 GiB of model states + 9.3 GiB "
                             "activations > 0.9 x 80.0 GiB free on cuda:0; ZeRO-1 needs 44.2 GiB + 9.3 GiB <= "
                             "0.9 x 80.0 GiB)")


@pytest.mark.parametrize("memory_gib, ranks, stage", [
    (200, 8, 0),  # everything fits: no partitioning, the least communication
    (80, 8, 1),
    (80, 2, 2),  # fewer ranks: ZeRO-1's whole fp32 gradients no longer fit; ZeRO-2 partitions them
    (40, 4, 3),  # only ZeRO-3's partitioned 16-bit weights fit
])
def test_the_stage_follows_device_memory_and_world_size(memory_gib, ranks, stage):
    assert choose_zero_stage(workload(5e9), ranks, Budget(memory_gib * GIB, "free on cuda:0")).stage == stage


def test_nothing_fits_chooses_zero3_and_says_what_to_change():
    choice = choose_zero_stage(workload(5e9), 1, H100)
    assert choice.stage == 3 and not choice.fits
    assert "ZeRO-3, the least memory, though no stage fits" in choice.reason
    assert "model.grad_checkpointing=true" in choice.reason and "engine.offload" in choice.reason


def test_activations_count_against_the_same_memory():
    # Model states alone fit at ZeRO-0 (1B x 16 B = 14.9 GiB of 72 GiB); 60 GiB of activations do not.
    units = [int(60 * GIB / 40)]
    assert choose_zero_stage(workload(1e9, precision="bf16"), 8, H100, autocast=False).stage == 0
    assert choose_zero_stage(workload(1e9, units=units), 8, H100, autocast=False).stage == 1
    checkpointed = workload(1e9, units=[u // 100 for u in units * 100], checkpointing=True)
    assert choose_zero_stage(checkpointed, 8, H100, autocast=False).stage == 0


def test_autocast_weighs_fp32_weights_where_it_would_run_with_them():
    p = 4 * GIB  # parameters
    work = workload(p)
    assert needs(work, 2, 2, "auto", "none") == (12 * p, 2 * p)  # fp32 weights, and autocast's 16-bit copies
    assert needs(work, 3, 2, "auto", "none") == (8 * p, 0)  # auto: DeepSpeed's 16-bit weights at ZeRO-3
    assert needs(work, 3, 2, True, "none") == (10 * p, 2 * p)
    assert needs(work, 2, 2, False, "none") == (9 * p, 0)
    assert needs(workload(p, precision="fp32"), 3, 2, "auto", "none") == (10 * p, 0)  # fp32 weights, nothing cast
    small = Budget(40 * GIB, "free on cuda:0")
    auto = choose_zero_stage(work, 2, small)
    assert auto.stage == 3 and auto.fits and "ZeRO-3 needs 32.0 GiB + 0.0 MiB <= 0.9 x 40.0 GiB" in auto.reason
    assert not choose_zero_stage(work, 2, small, autocast=True).fits


def test_offload_settings_narrow_the_stages():
    big = Budget(1000 * GIB, "free on cuda:0")
    assert choose_zero_stage(workload(1e6), 8, big, offload="optimizer").stage == 1
    assert choose_zero_stage(workload(1e6), 8, big, offload="all").stage == 3
    assert choose_zero_stage(workload(1e6), 8, big, offload="optimizer", offload_path="/nvme").stage == 3


def test_a_resumed_run_keeps_its_checkpoints_stage_and_says_what_a_fresh_start_would_choose():
    choice = choose_zero_stage(workload(5e9), 8, H100, kept=2)
    assert choice.stage == 2 and choice.fits
    assert choice.reason.startswith("engine.zero_stage=auto: ZeRO-2, the stage of the checkpoints this run resumes "
                                    "(ZeRO-2 needs 27.9 GiB of model states")
    assert "a fresh start would choose ZeRO-1 (ZeRO-0 needs" in choice.reason
    assert not choose_zero_stage(workload(5e9), 8, H100, kept=0).fits
    # A stage the offload settings rule out is not kept.
    assert choose_zero_stage(workload(5e9), 8, H100, offload="optimizer", kept=0).stage == 1


# -- the run's side ---------------------------------------------------------------------------------------
class Ranks:
    """A stand-in DistEnv whose ranks report the given (host, device, free bytes)."""

    def __init__(self, reports, device="cpu"):
        import torch

        self.reports, self.device, self.world_size, self.is_main = reports, torch.device(device), len(reports), True

    def gather_objects(self, _mine):
        return self.reports


def test_the_budget_is_the_smallest_share_of_any_rank():
    budget = device_budget(Ranks([("a", "cpu", 64 * GIB), ("a", "cpu", 64 * GIB), ("b", "cpu", 40 * GIB)]))
    assert budget == Budget(32 * GIB, "on the CPU of a (64.0 GiB available / 2 processes)")
    gpus = device_budget(Ranks([("a", "cuda:0", 79 * GIB), ("a", "cuda:1", 70 * GIB)]))
    assert gpus == Budget(70 * GIB, "free on cuda:1")


def test_the_workload_counts_the_objectives_parameters_and_every_views_blocks():
    cfg = synthetic_config("data.image_size=32", "data.batch_size=4", *TINY_DINO)
    work = measure_workload(cfg, RunContext(10, 1, 1, DistEnv(), cfg.engine.precision))
    assert work.trainable > 0 and work.frozen > 0  # DINO's teacher
    # 2 global crops of 32 px (8 x 8 patches + the class token) and 2 local crops of 16 px, 2 blocks, 32 wide.
    assert sorted(work.block_units) == sorted([65 * 32] * 4 + [17 * 32] * 4)
    assert work.micro_batch == 4 and not work.checkpointing


def test_resolving_replaces_auto_and_leaves_a_named_stage_alone(tmp_path):
    cfg = synthetic_config("data.image_size=32", f"run.dir={tmp_path}", "engine.zero_stage=auto", *TINY_VIT)
    ctx = RunContext(10, 1, 1, DistEnv(), cfg.engine.precision)
    resolved, choice = resolve_zero_stage(cfg, DistEnv(), ctx)
    assert resolved.engine.zero_stage == choice.stage == 0  # a tiny model on this machine's memory
    assert choice.reason.startswith("engine.zero_stage=auto: ZeRO-0 (ZeRO-0 needs ") and "on the CPU (" in choice.reason
    named = synthetic_config("engine.zero_stage=2")
    assert resolve_zero_stage(named, DistEnv(), ctx) == (named, None)


def test_the_recorded_stage_is_read_only_for_a_run_that_resumes(tmp_path):
    cfg = synthetic_config(f"run.dir={tmp_path}", "engine.zero_stage=auto")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"engine": {"zero_stage": 2}}))
    assert recorded_stage(cfg) is None  # no checkpoint: a fresh start
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000002")
    assert recorded_stage(cfg) == 2
    assert recorded_stage(synthetic_config(f"run.dir={tmp_path}", "train.resume=false")) is None
    (tmp_path / "config.yaml").write_text("engine: [")
    assert recorded_stage(cfg) is None


# -- the config key ---------------------------------------------------------------------------------------
def test_auto_parses_from_overrides_and_recipes(tmp_path):
    assert synthetic_config("engine.zero_stage=auto").engine.zero_stage == "auto"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("engine: {zero_stage: auto, offload: all}\ndata: {synthetic: true}\ntrain: {steps: 1}\n")
    assert load_config(recipe).engine.zero_stage == "auto"


@pytest.mark.parametrize("value", ["automatic", "4", "true", "[1]"])
def test_a_bad_stage_names_the_key(value):
    with pytest.raises(ConfigError, match=r"engine\.zero_stage="):
        synthetic_config(f"engine.zero_stage={value}")


# -- a run ------------------------------------------------------------------------------------------------
RUN = """
import json, logging, sys
logging.basicConfig(level=logging.INFO)
import pretrain.zero_stage as zero_stage
from pretrain.dist import init_distributed
from pretrain.trainer import Trainer
from tests.conftest import QUIET, TINY_VIT
from tests.helpers import tiny_config

run_dir = sys.argv[1]
dist = init_distributed()
common = [*QUIET, *TINY_VIT, "data.num_classes=10", "train.ckpt_every=2", "train.export=false",
          "engine.zero_stage=auto"]
Trainer(tiny_config(run_dir, *common, "train.stop_at=2"), dist).fit()
first = json.load(open(run_dir + "/run.json"))["zero_stage_auto"]
# The same run on a machine with 1 MiB to spare: a fresh start would choose ZeRO-3.
zero_stage.device_budget = lambda dist: zero_stage.Budget(2**20, "on the CPU (forced)")
trainer = Trainer(tiny_config(run_dir, *common), dist)
trainer.fit()
print("RESULT", json.dumps({"first": first, "second": json.load(open(run_dir + "/run.json")), "step": trainer.step}))
"""


def test_a_tiny_run_records_its_stage_and_keeps_it_when_it_resumes(tmp_path):
    done = subprocess.run([sys.executable, "-c", RUN, str(tmp_path)], cwd=REPO, env=python_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["first"]["stage"] == 0 and result["first"]["reason"].startswith("engine.zero_stage=auto: ZeRO-0 (")
    second = result["second"]
    assert result["step"] == 10 and second["state"] == "finished" and second["resumed_from"] == "step_00000002"
    assert second["zero_stage_auto"]["stage"] == 0
    assert "ZeRO-0, the stage of the checkpoints this run resumes" in second["zero_stage_auto"]["reason"]
    assert "a fresh start would choose ZeRO-3, the least memory, though no stage fits" in \
        second["zero_stage_auto"]["reason"]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["engine"]["zero_stage"] == 0
    assert "WARNING:pretrain.zero_stage:engine.zero_stage=auto: ZeRO-0, the stage" in done.stderr  # it does not fit
    assert f"{MEMORY_MARGIN:g} x 1.0 MiB on the CPU (forced)" in done.stderr
