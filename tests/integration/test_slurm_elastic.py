"""A run stopped mid-epoch on 2 Slurm tasks is submitted again with 1 task: it resumes from ``latest``
and trains on the rest of the interrupted epoch, every sample once (the one-node Slurm of ``.ci/slurm-up``)."""

from __future__ import annotations

import json
from collections import Counter

from tests.conftest import QUIET, TINY_VIT
from tests.faults import KEYS_ENV, fault_env
from tests.integration.test_slurm import (ONE_TASK, RECIPE, TWO_TASKS, logs, losses, slurm_up,  # noqa: F401
                                          submit, wait_ended)
from tests.unit.data_samples import write_counted_shards

COUNTS = [9, 5, 7, 4, 8, 7]  # 40 samples: 5 steps of a global batch of 8 per epoch
STEPS, STOP = 6, 2


def test_resumed_with_one_task_instead_of_two(tmp_path, monkeypatch):
    shards, run_dir = tmp_path / "shards", tmp_path / "run"
    write_counted_shards(shards, COUNTS)
    stage = ["pretrain", RECIPE, f"run.dir={run_dir}", f"data.train={shards}", "data.val=null", "data.prepare=none",
             *TINY_VIT, *QUIET, "data.num_classes=3", "data.global_batch=8", "data.batch_size=4",
             "data.shuffle_buffer=6", "train.epochs=null", f"train.steps={STEPS}", "train.log_every=1",
             "train.eval_every=0", "train.ckpt_every=0", "optim.warmup_steps=0"]
    keys = {}
    for tasks, phase, extra in ((TWO_TASKS, "two", [f"train.stop_at={STOP}"]), (ONE_TASK, "one", [])):
        keys[phase] = tmp_path / f"keys-{phase}"
        keys[phase].mkdir()
        for name, value in fault_env({}, **{KEYS_ENV: str(keys[phase])}).items():
            monkeypatch.setenv(name, value)  # sbatch hands the environment to the job
        (job_id,) = submit(*tasks, "--", *stage, *extra)
        assert wait_ended(job_id) == "COMPLETED", logs(run_dir)

    first = [json.loads(line) for f in sorted(keys["two"].glob("*.jsonl")) for line in f.read_text().splitlines()]
    rest = [json.loads(line) for line in (keys["one"] / "keys-0.jsonl").read_text().splitlines()]
    assert len(first) == 2 * STOP and len(rest) == STEPS - STOP
    epoch = Counter(k for batch in first + rest[:sum(COUNTS) // 8 - STOP] for k in batch)
    assert set(epoch) == {f"s{s}-{i}" for s, n in enumerate(COUNTS) for i in range(n)} and max(epoch.values()) == 1
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["world_size"] == 1 and summary["step"] == STEPS and summary["resumed_from"] == f"step_{STOP:08d}"
    assert summary["resized"] == {"world_size": [2, 1]}
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
