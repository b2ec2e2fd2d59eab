"""One rank of the partitioned-build check (run by test_zero_init.py on 2 processes).

For each objective named, it builds the objective as the trainer does under ZeRO-3, with
``engine.zero_init`` on and then off, and records the most parameter elements that were held
whole on this rank at any one time during the build (looked at on every torch call), and what
each parameter holds afterwards. Rank 0 writes the results.
"""

from __future__ import annotations

import json
import sys
import weakref
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from pretrain.config import load_config
from pretrain.dist import init_distributed
from pretrain.engine import build_module, partitioned_numel
from pretrain.objectives.base import RunContext
from pretrain.objectives.build import build_objective
from tests.helpers import end_worker


class WholeElements(TorchFunctionMode):
    """The most elements held at once by the parameters made inside the block (a partitioned
    parameter holds none: its values are in its ZeRO-3 partition)."""

    def __enter__(self):
        self.made, self.most = [], 0
        self.original = torch.nn.Parameter.__new__
        made, original = self.made, self.original

        def tracked(cls, data=None, requires_grad=True):
            param = original(cls, data, requires_grad)
            made.append(weakref.ref(param))
            return param

        torch.nn.Parameter.__new__ = tracked
        return super().__enter__()

    def __exit__(self, *exc):
        torch.nn.Parameter.__new__ = self.original
        self._look()
        return super().__exit__(*exc)

    def _look(self):
        held = sum(p.numel() for p in (ref() for ref in self.made) if p is not None)
        self.most = max(self.most, held)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self._look()
        return func(*args, **(kwargs or {}))


def build(overrides: list[str], dist, zero_init: bool) -> tuple[torch.nn.Module, int]:
    cfg = load_config(None, overrides + [f"engine.zero_init={str(zero_init).lower()}"])
    torch.manual_seed(cfg.run.seed)
    ctx = RunContext(num_classes=10, total_steps=10, steps_per_epoch=10, dist=dist, precision=cfg.engine.precision)
    with WholeElements() as whole:
        module = build_module(lambda: build_objective(cfg, ctx), cfg, dist)
    return module, whole.most


def main() -> None:
    out, cases = sys.argv[1], json.loads(sys.argv[2])
    dist = init_distributed()
    torch.set_num_threads(1)
    results = {}
    for name, overrides in cases.items():
        partitioned, most_whole = build(overrides, dist, zero_init=True)
        params = list(partitioned.parameters())
        mine = {"numel": sum(partitioned_numel(p) for p in params),
                "largest": max(partitioned_numel(p) for p in params),
                "held_in_partitions": sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor")),
                "held_whole_after": sum(p.numel() for p in params),
                "most_whole": most_whole}
        del partitioned, params
        _, mine["most_whole_unpartitioned_build"] = build(overrides, dist, zero_init=False)
        everyone = [None] * dist.world_size
        torch.distributed.all_gather_object(everyone, mine)
        results[name] = everyone
    if dist.is_main:
        Path(out).write_text(json.dumps(results))
    end_worker()


if __name__ == "__main__":
    main()
