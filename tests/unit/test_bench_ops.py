"""bench ops counts what a step dispatches: every aten op, and every host read of a tensor's values
(item, tolist) with the line that asked for it; the warm-up and the logging step are left out."""

from __future__ import annotations

import torch

from pretrain.bench.ops import counted


def test_ops_and_host_syncs_are_counted_per_step_with_their_line():
    x = torch.ones(4)
    steps = 4

    def run(mark):
        for step in range(steps):
            mark()
            y = (x * 2 + 1).sum()  # 3 ops
            y.item()  # one sync: _local_scalar_dense
            x.tolist()  # one sync without an aten op on a CPU tensor
            if step == steps - 1:  # the logging step, not counted
                y.item()

    result = counted(run, steps)
    assert result["ops"] == 4  # mul, add, sum, _local_scalar_dense
    where = {what.split(" at ")[0]: what.split(" at ")[1] for what in result["syncs"]}
    assert set(result["syncs"].values()) == {1.0} and set(where) == {"_local_scalar_dense", "tolist"}
    assert all(line.startswith("tests/unit/test_bench_ops.py:") for line in where.values()), where
