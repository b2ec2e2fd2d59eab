"""Every objective stopped on 2 processes inside each window of its schedule (the first step; the
lr warm-up; DINO's and DINOv2's frozen last layer, and its last frozen step; the teacher-temperature
warm-up; the step before the last) resumes on 1 process: the re-sharded state (weights, teacher,
buffers, Adam's moments and each group's step count) is the one saved, and the run ends with the
step counts of the uninterrupted run."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_SWIN, TINY_VIT, run_worker
from tests.helpers import RUN_DINO, RUN_MOBY, TINY_DINOV2, ZERO3_SMALL_PERSISTENCE
from tests.unit.data_samples import write_counted_shards

pytestmark = pytest.mark.slow

COUNTS = [9, 5, 7, 4, 8, 7]  # 40 samples: 5 steps of a global batch of 8 per epoch
STEPS = 6
STOPS = [1, 3, 5]  # inside the warm-up and the freeze; the freeze's last step (3 steps); before the last
COMMON = ["run.threads=1", "train.progress=false", "data.workers=0", "data.image_size=32", "data.global_batch=8", "data.batch_size=4",
          "data.shuffle_buffer=6", "data.num_classes=3", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]",
          "train.log_every=1", "optim.lr=0.003", "optim.warmup_steps=4", "engine.precision=fp32",
          f"train.steps={STEPS}", "train.epochs=null"]
FROZEN = ["objective.freeze_last_layer_epochs=0.6", "objective.teacher_temp_warmup_epochs=0.8"]  # 3 and 4 steps
CASES = {
    "dino": [*RUN_DINO, *FROZEN, "engine.zero_stage=2"],
    "dinov2": [*TINY_DINOV2, *FROZEN, "engine.zero_stage=3", ZERO3_SMALL_PERSISTENCE],
    "moby": [*RUN_MOBY, "engine.zero_stage=3", ZERO3_SMALL_PERSISTENCE],
    "supervised": [*TINY_VIT, "objective.name=supervised", "objective.mixup=0", "objective.cutmix=0",
                   "engine.zero_stage=1"],
    "simmim": [*TINY_SWIN, "objective.name=simmim", "objective.mask_patch_size=8", "objective.hflip=0",
               "engine.zero_stage=2"],
}


def test_every_objective_resumes_elsewhere_from_every_window_of_its_schedule(tmp_path):
    shards = tmp_path / "shards"
    write_counted_shards(shards, COUNTS)
    cases = {name: [f"data.train={shards}", *COMMON, *overrides] for name, overrides in CASES.items()}
    for nproc, phase in ((2, "reference"), (1, "resume")):
        run_worker("schedule_resume_worker", str(tmp_path), json.dumps(cases), json.dumps(STOPS), phase, nproc=nproc)
    for name in CASES:
        reference = json.loads((tmp_path / f"{name}-reference.json").read_text())
        for stop in STOPS:
            found = json.loads((tmp_path / f"{name}-{stop}-resume.json").read_text())
            assert found["compared"] > 10 and found["differs"] == [], (name, stop, found["differs"][:5])
            assert found["adam_steps"] == found["saved_adam_steps"], (name, stop, found)
            assert (found["step"], found["state"]) == (STEPS, "finished"), (name, stop)
            assert found["final_adam_steps"] == reference, (name, stop, found["final_adam_steps"], reference)
